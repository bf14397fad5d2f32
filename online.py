"""
On-policy and online DPO: pairs of the model's own replies, judged, for dpo.py.

The paper samples its pairs from pi_SFT (section 4), and so pi_ref = pi_SFT
fits the data; the world's pairs are written by a generator instead, and DPO then pushes down
replies the model would rarely write. --pairs on-policy samples K replies per prompt from the start
model and pairs the judge's best with its worst; --rounds R (online, or iterative, DPO: Xu et al.
2023, arXiv 2312.16682; Guo et al. 2024, arXiv 2402.04792) samples each round's pairs from the
current policy, the reference staying the start. That is the bridge to rlvr.py: the policy learns
from its own samples in both, but here from a judge's pairwise choice, through DPO's loss against a
fixed reference, on pairs frozen for a round; GRPO scores every sample with a reward, weighs it by
its advantage over its group, and samples anew at every step.

A round's pairs: K replies per prompt (--samples-per-prompt, at --sample-temperature), ranked by the
judge, the best paired with the worst (on_policy_pairs), written under the stage's output as a
TRL-format file and read back through the --data reader, so a sampled pair is held to the same
checks as a user's.

    python dpo.py --pairs on-policy              (pairs of the SFT model's own replies, judged)
    python dpo.py --pairs on-policy --rounds 3   (online DPO: each round's pairs from the current policy)
"""

import dataclasses
import json
import os
import random
import time

import torch

import model as M
import plumbing as P
import resume as R
from data import formats, world
from plumbing import option


@dataclasses.dataclass
class OnPolicyOptions:
    """The on-policy and online flags, for dpo.py's config to inherit."""
    pairs: str = option("file", "where the training pairs come from: file (--data, default <data-dir>/prefs.jsonl, "
                        "written by the world's generator) or on-policy (sampled from the start model, judged)", "dpo")
    samples_per_prompt: int = option(4, "on-policy: K replies per prompt; the judge's best against its worst", "dpo")
    sample_temperature: float = option(1.0, "on-policy: the temperature the K replies are sampled at", "dpo")
    rounds: int = option(1, "online DPO: R rounds, each on pairs sampled from the current policy (the "
                         "reference stays the start); needs --pairs on-policy", "dpo")


def on_policy_pairs(sample, problems, k):
    """For each problem, k replies from sample(prompts) -> replies (one per prompt, in order), ranked
    by the judge; the best is paired with the worst (the first of equals). A reply with no text (the
    model ended its turn at once) is left out: a pair file's replies are text. A problem whose other
    replies all score the same, or number fewer than two, has no preference to give: no pair.
    -> (rows {"prompt", "chosen", "rejected", "answer"}, the number of problems that gave none)"""
    replies = sample([p["prompt"] for p in problems for _ in range(k)])
    rows, ties = [], 0
    for i, problem in enumerate(problems):
        group = [reply for reply in replies[i * k: (i + 1) * k] if reply.strip()]
        scores = [world.judge(problem, reply) for reply in group]
        if len(group) < 2 or max(scores) == min(scores):
            ties += 1
            continue
        best, worst = scores.index(max(scores)), scores.index(min(scores))
        rows.append({"prompt": problem["prompt"], "chosen": group[best], "rejected": group[worst],
                     "answer": problem["answer"]})
    return rows, ties


def sample_pairs(model, enc, problems, quota, config, seed, path):
    """`quota` on-policy pairs from the model, K = --samples-per-prompt replies per prompt at
    --sample-temperature, from the problems in order (a few more than quota, to cover ties), written
    to `path` as TRL-format JSONL and read back through the --data reader.
    -> (pairs, the number of problems used, stats: samples, ties, seconds)"""
    t0, rows, ties, used, k = time.time(), [], 0, 0, config.samples_per_prompt
    with torch.no_grad(), P.eval_mode(model):
        while len(rows) < quota and used < len(problems):
            chunk = problems[used: used + max(8, int((quota - len(rows)) * 1.1))]

            def sample(prompts):  # each chunk its own seed, the same on every machine
                return M.sample_replies(model, enc, prompts, config.max_new_tokens, config.sample_temperature,
                                        seed + used)
            built, tied = on_policy_pairs(sample, chunk, k)
            rows, ties, used = rows + built, ties + tied, used + len(chunk)
    rows = rows[:quota]
    P.write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
    seconds = time.time() - t0
    print(f"dpo: {len(rows)} on-policy pairs from {used} prompts x {k} samples (T = {config.sample_temperature}; "
          f"{ties} prompts tied or empty: no pair) in {seconds:.0f}s ({used * k / seconds:.0f} samples/s) -> {path}")
    P.require(rows, f"{path}: every prompt's samples tied: no on-policy pair (raise --sample-temperature?)")
    return formats.read_pairs(path), used, {"samples": used * k, "ties": ties, "seconds": seconds}


def first_round(config, init, device, tokenizer_path, enc, out_dir):
    """On-policy pairs from the start model (for --rounds R, the first round's share of --max-pairs),
    its prompts those of <data-dir>/prefs.jsonl, shuffled. -> (pairs, the sampling's running record)"""
    problems = formats.read_problems(os.path.join(config.data_dir, "prefs.jsonl"))
    random.Random(config.seed).shuffle(problems)
    online = {"problems": problems, "used": 0, "rounds": 0, "samples": 0, "ties": 0, "seconds": 0.0,
              "quota": (config.max_pairs or len(problems)) // config.rounds}
    path = os.path.join(out_dir, "pairs_round1.jsonl")
    if config.resume and os.path.exists(R.state_path(out_dir)) and os.path.exists(path):
        online["rounds"] = 1  # sampled before the cut (the state holds the file's hash): read back
        return formats.read_pairs(path), online
    start, _ = M.load_checkpoint(init, device, tokenizer_path)  # the policy before any step
    rows = sample_round(config, start, enc, online, out_dir)
    return rows, online


def sample_round(config, model, enc, online, out_dir):
    """The next round's pairs, sampled from `model` on the next unused prompts (see sample_pairs)."""
    online["rounds"] += 1
    path = os.path.join(out_dir, f"pairs_round{online['rounds']}.jsonl")
    seed = config.seed * 1000 + 100 * online["rounds"]  # apart from the evaluation's seed, and per round
    rows, used, stats = sample_pairs(model, enc, online["problems"][online["used"]:], online["quota"], config,
                                     seed, path)
    online["used"] += used
    for k in ("samples", "ties", "seconds"):
        online[k] += stats[k]
    online["samples_per_second"] = online["samples"] / online["seconds"]
    return rows


def check_on_policy_flags(config, config_cls):
    """The on-policy and online flags, checked before anything is built (ConfigError), and none that
    changes nothing without --pairs on-policy (config_cls: the config class, for its defaults)."""
    P.require(config.pairs in ("file", "on-policy"), f"--pairs {config.pairs!r} is unknown; known: file, on-policy")
    P.require(config.rounds >= 1, f"--rounds must be >= 1, got {config.rounds}")
    if config.pairs == "on-policy" or config.rounds > 1:
        P.require(config.pairs == "on-policy", "--rounds samples each round's pairs from the policy: it needs "
                  "--pairs on-policy")
        P.require(not config.data, "--data holds pairs written elsewhere; --pairs on-policy samples them (its "
                  "prompts from <data-dir>/prefs.jsonl)")
        P.require(config.samples_per_prompt >= 2, f"--samples-per-prompt must be >= 2 (a pair needs two "
                  f"replies), got {config.samples_per_prompt}")
        P.require(config.sample_temperature > 0, f"--sample-temperature must be > 0: at {config.sample_temperature} "
                  f"all {config.samples_per_prompt} replies to a prompt are the same")
        P.require(config.loss_type != "kto" and not config.label_noise, "--pairs on-policy: the judge labels the "
                  "pairs; KTO and --label-noise work on a file's")
    P.require(config.pairs == "on-policy" or (config.samples_per_prompt, config.sample_temperature) == (
        config_cls.samples_per_prompt, config_cls.sample_temperature), "--samples-per-prompt and --sample-temperature "
        "shape sampled pairs: they need --pairs on-policy")
