"""
Why IPO? The over-training run of overtraining.py, once with DPO's loss (sigmoid) and once with
IPO's (Azar et al. 2023): IPO regresses the per-token log-ratio margin onto a target, 1/(2 beta),
instead of pushing it ever higher, so its margin should stay bounded where DPO's runs away, and its
held-out judge score should suffer less from the over-training. The table and plot show the margin
dpo.py logs, beta times the difference of the summed log-ratios; a per-token target bounds it, but
at no fixed value, and not at 1/(2 beta) itself.

    python experiments/ipo_vs_dpo.py            (minutes on a 2-core CPU: docs/exercises.md)
    python experiments/ipo_vs_dpo.py --quick    (seconds: a tiny world, for tests)
"""

import common
import overtraining


def main(argv=None):
    args = common.parse_args(__doc__, argv)
    s = common.setup("ipo_vs_dpo", args)
    rows, curves = [], {}
    for loss_type in ("sigmoid", "ipo"):
        metrics, log = overtraining.run(s, loss_type, loss_type=loss_type)
        curves[loss_type] = [(r["step"], r["rewards/margins"]) for r in log]
        rows.append({"loss_type": loss_type, "margin_end": log[-1]["rewards/margins"],
                     "chosen_logp_end": log[-1]["logps/chosen"], "judge_score_end": metrics["judge_score_policy"],
                     "win_rate": metrics["win_rate"], "kl": metrics["kl"]})
    common.write_results(s, {"rows": rows, "curves": curves},
                         ["loss_type", "margin_end", "chosen_logp_end", "judge_score_end", "win_rate", "kl"],
                         f"DPO and IPO over-trained ({overtraining.WHAT})")

    def draw(plt):
        for loss_type, curve in curves.items():
            plt.plot([c[0] for c in curve], [c[1] for c in curve], label=loss_type)
        plt.xlabel("step")
        plt.ylabel("margin: beta * (log-ratio chosen - rejected)")
        plt.legend()

    common.plot(s, draw)
    return rows


if __name__ == "__main__":
    common.run(main)
