"""
How fast is a DPO step, and how much of its work does the loss need? DPO training steps on this
project's own preference pairs (batch 32, reference log-probs precomputed, as dpo.py trains), at
the default size and at ~5M parameters (6 layers, 8 heads, 256 wide), from a random init: the
output layer and its log_softmax over the vocabulary at every position (plain), against only at
the response positions the loss scores (scored: model.shifted_logprobs). Each variant runs several
times in this one process, alternating; the table gives medians, the ratio to plain, and MFU two
ways: of the work done, and of the work the loss needs (no padding; the head on scored positions).

    python experiments/throughput.py            (a few minutes on a 2-core CPU)
    python experiments/throughput.py --quick    (seconds: a tiny world, for tests)
"""

import os
import random
import statistics
import time

import common
import torch

import dpo
import model as M
import plumbing as P
from data import formats

SIZES = {"default": dict(n_layer=4, n_head=4, n_embd=128), "5M": dict(n_layer=6, n_head=8, n_embd=256)}
BATCH, STEPS, REPEATS = 32, 8, 3


def plain_sequence_logprobs(model, ids, mask):
    """dpo.sequence_logprobs the plain way: the output layer at every position, then the mask."""
    with P.autocast(ids.device):
        logits = model(ids[:, :-1])  # (B, T-1, V)
    logps = M.token_logprobs(logits, ids[:, 1:])  # (B, T-1)
    return (logps * mask[:, 1:]).sum(-1)  # (B,)


VARIANTS = {"plain": plain_sequence_logprobs, "scored": dpo.sequence_logprobs}


def timed_steps(policy, opt, batches, ref, logprobs):
    """Seconds for DPO steps on these batches (each: log-probs, the loss, backward, AdamW)."""
    t0 = time.perf_counter()
    for (ids, mask), (rc, rr) in zip(batches, ref):
        logps = logprobs(policy, ids, mask)  # (2B,): chosen rows, then rejected
        B = len(ids) // 2
        loss, _, _ = dpo.dpo_loss(logps[:B], logps[B:], rc, rr, beta=1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def measure(size, examples, vocab, device, steps, repeats):
    torch.manual_seed(0)
    policy = M.GPT(M.GPTConfig(vocab_size=vocab, **SIZES[size])).to(device).eval()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    rng = random.Random(0)
    batches = [dpo.collate(rng.sample(examples, BATCH), 0, device) for _ in range(steps)]
    with torch.no_grad():
        ref = [(lp[:BATCH].detach(), lp[BATCH:].detach()) for lp in (dpo.sequence_logprobs(policy, *b) for b in batches)]
    positions = sum(ids[:, 1:].numel() for ids, _ in batches)
    scored = sum(int(mask[:, 1:].sum()) for _, mask in batches)
    real = sum(len(ex["prompt"]) + len(ex[k]) - 1 for ex in examples for k in ("chosen", "rejected")) / len(examples)
    real *= BATCH * steps  # the mean real length: the batches draw from all pairs
    T = max(ids.shape[1] for ids, _ in batches)
    needed = M.training_flops(policy, real, scored, T)
    done = {"plain": M.training_flops(policy, positions, positions, T), "scored": M.training_flops(policy, positions,
                                                                                                    scored, T)}
    timed_steps(policy, opt, batches[:2], ref[:2], dpo.sequence_logprobs)  # warm up
    seconds = {v: [] for v in VARIANTS}
    for _ in range(repeats):  # alternating, so a drift of the machine's speed hits both alike
        for name, fn in VARIANTS.items():
            seconds[name].append(timed_steps(policy, opt, batches, ref, fn))
    peak = P.peak_flops(device)
    rows = []
    for name in VARIANTS:
        s = statistics.median(seconds[name])
        rows.append({"size": size, "parameters": policy.num_params(), "variant": name,
                     "pairs_per_second": BATCH * steps / s, "tokens_per_second": positions / s,
                     "scored_tokens_per_second": scored / s, "mfu": done[name] / s / peak,
                     "mfu_needed": needed / s / peak,
                     "speedup": statistics.median(seconds["plain"]) / s, "peak_gflops": peak / 1e9,
                     "range_seconds": f"{min(seconds[name]):.2f}-{max(seconds[name]):.2f}"})
    return rows


def main(argv=None):
    args = common.parse_args(__doc__, argv)
    s = common.setup("throughput", args)
    device = P.pick_device(args.device)
    enc = M.load_tokenizer(os.path.join(s["data_dir"], "tokenizer.json"))
    pairs = formats.read_pairs(os.path.join(s["data_dir"], "prefs.jsonl"))
    examples, _ = dpo.tokenize_pairs(enc, pairs, 96, 192)
    steps, repeats, sizes = (2, 2, ["default"]) if s["quick"] else (STEPS, REPEATS, list(SIZES))
    rows = [row for size in sizes for row in measure(size, examples, enc.n_vocab, device, steps, repeats)]
    common.write_results(s, {"rows": rows}, ["size", "parameters", "variant", "pairs_per_second",
                                             "tokens_per_second", "scored_tokens_per_second", "mfu", "mfu_needed",
                                             "speedup", "peak_gflops", "range_seconds"],
                         f"DPO steps, batch {BATCH}, {steps} steps x {repeats} alternating runs (medians)")


if __name__ == "__main__":
    common.run(main)
