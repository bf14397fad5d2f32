"""
What does the KV cache buy? Sampling with it, each step feeds one new token and attends over the
keys and values kept from the prefix; without it, each step recomputes the whole prefix. Both draw
the same tokens from the same seed, so the only difference is the work: the cache turns a step's
cost from the prefix's length to one token. The SFT model samples replies to the RL problems with
and without the cache, a few times each, and the table gives the medians and the speed-up.

    python experiments/kv_cache.py            (about a minute on a 2-core CPU)
    python experiments/kv_cache.py --quick    (seconds: a tiny world, for tests)
"""

import os
import statistics
import time

import common
import torch

import model as M
import plumbing as P
from data import formats

PROMPTS, NEW_TOKENS, REPEATS = 64, 64, 3


def kv_cache_speedup(model, prompt_ids, new_tokens=NEW_TOKENS, seed=0):
    """Seconds to sample new_tokens for every prompt with the KV cache and without it, from the same
    seed, so both draw the same tokens. -> (cached s, uncached s)."""
    seconds = []
    for use_cache in (True, False):
        gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
        t = time.perf_counter()  # a fine clock: a short sample can take less than time.time()'s tick
        M.generate(model, prompt_ids, new_tokens, stop_token=-1, generator=gen, use_cache=use_cache)  # never stops
        seconds.append(time.perf_counter() - t)
    return tuple(seconds)


def room_for(model, prompt_ids, source, wanted=NEW_TOKENS):
    """NEW_TOKENS, or as many as the longest prompt leaves room for in the model's context."""
    longest, context = max(len(ids) for ids in prompt_ids), model.config.block_size
    P.require(context - longest > 0, f"{source}: the longest prompt is {longest} tokens long, leaving no room "
              f"in the model's {context}-token context")
    return min(wanted, context - longest)


def main(argv=None):
    args = common.parse_args(__doc__, argv)
    s = common.setup("kv_cache", args)
    tokenizer_path = os.path.join(s["data_dir"], "tokenizer.json")
    model, _ = M.load_checkpoint(s["init"], P.pick_device(args.device), tokenizer_path)
    enc = M.load_tokenizer(tokenizer_path)
    source = os.path.join(s["data_dir"], "rl.jsonl")
    prompt_ids = [M.render_prompt(enc, p["prompt"]) for p in formats.read_problems(source)[:PROMPTS]]
    new_tokens = room_for(model, prompt_ids, source)
    runs = [kv_cache_speedup(model, prompt_ids, new_tokens, seed) for seed in range(REPEATS)]
    cached, uncached = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    rows = [{"sampler": "KV cache", "seconds": cached, "tokens_per_second": len(prompt_ids) * new_tokens / cached},
            {"sampler": "recomputed prefix", "seconds": uncached,
             "tokens_per_second": len(prompt_ids) * new_tokens / uncached}]
    common.write_results(s, {"rows": rows, "speedup": uncached / cached, "peak_flops": P.peak_flops(model.wte.weight.device)},
                         ["sampler", "seconds", "tokens_per_second"],
                         f"{len(prompt_ids)} replies x {new_tokens} tokens, median of {REPEATS}",
                         f"The KV cache samples {uncached / cached:.1f}x faster.")


if __name__ == "__main__":
    common.run(main)
