"""
How does DPO fail? One DPO run far past its useful length (six epochs over 1000 pairs at the
paper's beta 0.1), logging the policy's log-prob of the chosen and of the rejected replies, the
margin every 5 steps, and the held-out judge score every 20. The DPO lesson warns that the margin can keep
growing while the chosen reply's own log-prob falls (both replies are pushed down, the rejected
one faster); dpo.py prints an early warning when that happens. Does it, and when?

    python experiments/overtraining.py          (minutes on a 2-core CPU: docs/exercises.md)
    python experiments/overtraining.py --quick  (seconds: a tiny world, for tests)
"""

import os

import common

SETTINGS = dict(beta=0.1, max_pairs=1000, epochs=6, log_every=5, eval_every=20, eval_every_problems=80,
                eval_problems=200)
WHAT = "beta {beta}, {epochs} epochs over {max_pairs} pairs".format(**SETTINGS)  # for the tables' titles


def run(s, name, settings=SETTINGS, **overrides):
    """One over-training run (settings, then overrides, over dpo.py's defaults) -> (metrics, the
    log's curve)."""
    settings = {**settings, **overrides}
    if s["quick"]:
        settings.update(steps=6, eval_every=2, eval_every_problems=4, eval_problems=8)
    metrics = common.dpo.train(common.dpo_config(s, name, **settings))
    return metrics, common.read_log(os.path.join(s["dir"], name, "dpo", "log.jsonl"))


def main(argv=None):
    args = common.parse_args(__doc__, argv)
    s = common.setup("overtraining", args)
    metrics, log = run(s, "sigmoid")
    curve = [{"step": r["step"], "chosen_logp": r["logps/chosen"], "rejected_logp": r["logps/rejected"],
              "margin": r["rewards/margins"], **({"judge_score": r["judge_score"]} if "judge_score" in r else {})}
             for r in log]
    judged = [c["judge_score"] for c in curve if "judge_score" in c]
    results = {"chosen_logp_start": curve[0]["chosen_logp"], "chosen_logp_end": curve[-1]["chosen_logp"],
               "margin_start": curve[0]["margin"], "margin_end": curve[-1]["margin"],
               "judge_score_start": metrics["judge_score_ref"], "judge_score_best": max(judged),
               "judge_score_end": metrics["judge_score_policy"], "warning_step": metrics["warning_step"],
               "steps": metrics["steps"], "kl": metrics["kl"], "curve": curve}
    common.write_results(s, results, ["steps", "chosen_logp_start", "chosen_logp_end", "margin_start", "margin_end",
                                      "judge_score_start", "judge_score_best", "judge_score_end", "warning_step", "kl"],
                         f"DPO over-trained ({WHAT})")

    def draw(plt):
        steps = [c["step"] for c in curve]
        top = plt.subplot(2, 1, 1)
        top.plot(steps, [c["chosen_logp"] for c in curve], label="log pi(chosen)")
        top.plot(steps, [c["rejected_logp"] for c in curve], label="log pi(rejected)")
        top.plot(steps, [c["margin"] for c in curve], label="margin (reward chosen - rejected)")
        if results["warning_step"] is not None:
            top.axvline(results["warning_step"], color="gray", linestyle="--", label="dpo.py's warning")
        top.set_ylabel("nats")
        top.legend(fontsize=7)
        bottom = plt.subplot(2, 1, 2, sharex=top)
        bottom.plot([c["step"] for c in curve if "judge_score" in c], judged, "o-", color="black")
        bottom.set_ylabel("held-out judge score")
        bottom.set_xlabel("step")

    common.plot(s, draw)
    return results


if __name__ == "__main__":
    common.run(main)
