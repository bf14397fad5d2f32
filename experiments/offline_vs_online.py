"""
When is online RL worth its cost? From the same SFT checkpoint, with the same wall-clock budget:
DPO on the fixed preference pairs (offline: no sampling while training) against rlvr.py's
GRPO-style RL (online: every step samples the policy and scores the replies with the verifier).
The budget is what the DPO run took (its reference pass and its steps); RL stops when it has
spent as much on sampling and updates. Both end models get the same held-out evaluation
(rlvr.py's: greedy accuracy, pass@8, the judge's score, KL to the SFT model).

    python experiments/offline_vs_online.py           (minutes on a 2-core CPU: docs/exercises.md)
    python experiments/offline_vs_online.py --quick   (seconds: a tiny world, for tests)
"""

import os

import common
import rlvr

EVAL_PROBLEMS = 300


def evaluate(s, name, init, eval_problems=EVAL_PROBLEMS, **overrides):
    """A run of rlvr.py from `init`, KL against the SFT model. With its defaults (steps=0) only the
    held-out evaluation; steps=N in overrides trains RL first, then evaluates."""
    kw = dict(init=init, data_dir=s["data_dir"], out=os.path.join(s["dir"], name), device=s["device"],
              steps=0, eval_reference=s["init"], eval_problems=eval_problems)
    if s["quick"]:
        kw.update(eval_problems=6, max_new_tokens=16, prompts_per_step=2, group_size=4)
    kw.update(overrides)
    return rlvr.train(rlvr.RLVRConfig(**kw))


def row(method, m, wall_seconds, samples):
    return {"method": method, "accuracy": m["accuracy_after"], "pass_at_1": m["pass_at_k"]["1"]["after"],
            "pass_at_8": m["pass_at_k"]["8"]["after"], "judge_score": m["judge_score_after"], "kl": m["kl"],
            "wall_seconds": wall_seconds, "samples": samples}


def main(argv=None):
    args = common.parse_args(__doc__, argv)
    s = common.setup("offline_vs_online", args)
    overrides = {} if s["quick"] else {"eval_problems": 0}  # evaluated below, as RL is
    d = common.dpo.train(common.dpo_config(s, "dpo", **overrides))
    budget = d["train_seconds"] + d["reference_pass_seconds"]
    dpo_eval = evaluate(s, "dpo_eval", os.path.join(s["dir"], "dpo", "dpo", "model.pt"))
    rl = evaluate(s, "rlvr", s["init"], steps=1000, max_seconds=budget)
    sft_row = row("SFT (start)", {**rl, "accuracy_after": rl["accuracy_before"], "judge_score_after": rl["judge_score_before"],
                                  "kl": rl["kl_before"], "pass_at_k": {k: {"after": v["before"]} for k, v in rl["pass_at_k"].items()}},
                  0.0, 0)
    rows = [sft_row, row("DPO (offline pairs)", dpo_eval, budget, 0),
            row("RLVR (online samples)", rl, rl["sample_seconds"] + rl["train_seconds"], rl["samples"])]
    common.write_results(s, {"rows": rows, "budget_seconds": budget, "dpo_training_pairs": d["pairs"]},
                         ["method", "accuracy", "pass_at_1", "pass_at_8", "judge_score", "kl", "wall_seconds", "samples"],
                         f"DPO and RLVR from the same SFT model, {budget:.0f} s of training each")

    def draw(plt):
        names = [r["method"].split(" ")[0] for r in rows]
        width = 0.35
        xs = range(len(rows))
        plt.bar([x - width / 2 for x in xs], [r["pass_at_1"] for r in rows], width, label="pass@1 (T = 1)")
        plt.bar([x + width / 2 for x in xs], [r["accuracy"] for r in rows], width, label="greedy accuracy")
        plt.xticks(list(xs), names)
        plt.ylabel("held-out accuracy")
        plt.legend()

    common.plot(s, draw)
    return rows


if __name__ == "__main__":
    common.run(main)
