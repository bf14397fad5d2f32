"""
What does beta do? DPO from the same SFT checkpoint at five values of beta (same pairs, steps,
seed and learning rate), each scored on the same held-out evaluation as dpo.py. beta is the
weight of the KL term in the objective DPO solves (eq. 3 of the paper), so a smaller beta should
buy more reward (win rate) for more KL: the reward-KL frontier of the paper's Figure 2, in small.

    python experiments/beta_sweep.py            (minutes on a 2-core CPU: docs/exercises.md)
    python experiments/beta_sweep.py --quick    (seconds: a tiny world, for tests)
"""

import common

BETAS = [0.01, 0.03, 0.1, 0.3, 1.0]
EVAL_PROBLEMS = 300  # held-out problems sampled per run (dpo.py's default is 500: five runs here)


def main(argv=None):
    args = common.parse_args(__doc__, argv)
    s = common.setup("beta_sweep", args)
    rows = []
    for beta in BETAS:
        overrides = {} if s["quick"] else {"eval_problems": EVAL_PROBLEMS}
        m = common.dpo.train(common.dpo_config(s, f"beta_{beta}", beta=beta, **overrides))
        rows.append({"beta": beta, "kl": m["kl"], "win_rate": m["win_rate"], "pref_accuracy": m["pref_accuracy"],
                     "accuracy": m["accuracy_policy"], "judge_score": m["judge_score_policy"]})
    rho = common.spearman([r["beta"] for r in rows], [r["kl"] for r in rows])
    common.write_results(s, {"rows": rows, "rank_correlation_beta_kl": rho},
                         ["beta", "kl", "win_rate", "pref_accuracy", "accuracy", "judge_score"],
                         "DPO at five betas",
                         f"Rank correlation of beta and KL: {rho:.2f} (the lesson expects it near -1).")

    def draw(plt):
        plt.plot([r["kl"] for r in rows], [r["win_rate"] for r in rows], "o-")
        for r in rows:
            plt.annotate(f"beta {r['beta']}", (r["kl"], r["win_rate"]), textcoords="offset points", xytext=(4, 4))
        if all(r["kl"] > 0 for r in rows):  # KL spans orders of magnitude (a sample estimate can dip below 0)
            plt.xscale("log")
        plt.xlabel("KL(policy || reference), nats per reply")
        plt.ylabel("judge win rate over the SFT reference")
        plt.title("The reward-KL frontier, one point per beta")

    common.plot(s, draw)
    return rows


if __name__ == "__main__":
    common.run(main)
