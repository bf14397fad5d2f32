"""
Whose replies should DPO learn from? From the same SFT model, the same number of pairs and steps,
over five seeds: the world's pairs (off-policy: written by a generator, as the default dpo.py
trains), pairs of the SFT model's own replies (on-policy: K samples per prompt, the judge's best
against its worst, as the DPO paper's section 4 assumes), and online DPO (three rounds, each on
pairs sampled from the current policy), each with plain DPO and with RPO (--rpo-alpha 3, the
likelihood-keeping setting of docs/dpo.md). Every run gets dpo.py's own evaluation: 500 held-out
problems sampled from SFT and the policy, and the held-out pair file for preference accuracy.

    python experiments/on_policy.py            (about an hour on a 2-core CPU: docs/exercises.md)
    python experiments/on_policy.py --quick    (seconds: a tiny world, for tests)
"""

import os
import statistics

import common
import dpo

SEEDS = (1, 2, 3, 4, 5)
SOURCES = {"off-policy": {}, "on-policy": {"pairs": "on-policy"}, "online x3": {"pairs": "on-policy", "rounds": 3}}
LOSSES = {"DPO": {}, "RPO (alpha 3)": {"rpo_alpha": 3.0}}
MEASURES = ("win_rate", "greedy_accuracy_policy", "accuracy_policy", "step_share", "kl", "pref_accuracy",
            "stage_seconds", "sample_seconds")


def measured(m):
    """The figures of one dpo.py run that the table compares."""
    sampling = m.get("sampling") or {}
    return {"win_rate": m["win_rate"], "greedy_accuracy_policy": m["greedy_accuracy_policy"],
            "greedy_accuracy_ref": m["greedy_accuracy_ref"], "accuracy_policy": m["accuracy_policy"],
            "step_share": m["style_shares_policy"]["step"], "kl": m["kl"], "pref_accuracy": m["pref_accuracy"],
            "stage_seconds": m["total_wall_seconds"], "sample_seconds": sampling.get("seconds", 0.0),
            "samples": sampling.get("samples", 0), "ties": sampling.get("ties", 0)}


def main(argv=None):
    args = common.parse_args(__doc__, argv)
    s = common.setup("on_policy", args)
    seeds = SEEDS[:1] if s["quick"] else SEEDS
    quick = {"max_pairs": 24} if s["quick"] else {}
    runs, rows, sampled, first_sampling = {}, [], {}, {}
    for source, source_flags in SOURCES.items():
        for loss, loss_flags in LOSSES.items():
            name = f"{source}, {loss}"
            runs[name] = []
            for seed in seeds:
                run = f"{source.split()[0].replace('-', '_')}_{loss.split()[0].lower()}/seed{seed}"
                flags = {**source_flags, **loss_flags, **quick}
                if s["quick"] and "pairs" in flags:
                    flags["samples_per_prompt"] = 2
                if source == "on-policy" and loss != "DPO":  # the same sampled pairs as the DPO run's, read back
                    flags = {**loss_flags, **quick, "data": sampled[seed]}
                m = dpo.train(common.dpo_config(s, run, seed=seed, **flags))
                if source == "on-policy" and loss == "DPO":
                    sampled[seed] = os.path.join(s["dir"], run, "dpo", "pairs_round1.jsonl")
                    first_sampling[seed] = m["sampling"]
                elif source == "on-policy":  # its pairs cost the DPO run's sampling: count it here too
                    m["sampling"] = first_sampling[seed]
                    m["total_wall_seconds"] += m["sampling"]["seconds"]
                runs[name].append({**measured(m), "seed": seed})
            row = {"setting": name, "seeds": len(seeds)}
            for k in MEASURES:
                values = [r[k] for r in runs[name]]
                row[k] = f"{statistics.median(values):.3g}" + (
                    f" ({min(values):.3g} to {max(values):.3g})" if len(values) > 1 else "")
            sft = runs[name][0]["greedy_accuracy_ref"]
            kept = sum(r["greedy_accuracy_policy"] >= sft - 0.01 for r in runs[name])
            row["greedy_kept"] = f"{kept} of {len(seeds)}"  # within 1 point of SFT's greedy accuracy
            rows.append(row)
    sft_greedy = next(iter(runs.values()))[0]["greedy_accuracy_ref"]
    common.write_results(s, {"rows": rows, "runs": runs, "sft_greedy_accuracy": sft_greedy, "seeds": list(seeds)},
                         ["setting", "seeds", *MEASURES, "greedy_kept"],
                         f"Off-policy, on-policy and online DPO from the same SFT model (greedy accuracy "
                         f"{sft_greedy:.1%}): medians over {len(seeds)} seeds")

    def draw(plt):
        for name, rs in runs.items():
            plt.scatter([r["greedy_accuracy_policy"] for r in rs], [r["win_rate"] for r in rs], label=name,
                        alpha=0.7, marker="o" if "DPO" in name else "^")
        plt.axvline(sft_greedy, color="gray", linestyle="--", label="SFT's greedy accuracy")
        plt.xlabel("greedy accuracy (held-out problems)")
        plt.ylabel("judge win rate against SFT")
        plt.legend(fontsize=7)

    common.plot(s, draw)
    return runs


if __name__ == "__main__":
    common.run(main)
