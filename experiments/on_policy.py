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

import dataclasses
import json
import os
import statistics

import common
import dpo
import plumbing as P

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


def done_before(config):
    """The metrics of a run this experiment already finished with this very config (its checkpoint
    records it), so that an experiment cut short picks up where it stopped; else None."""
    path = os.path.join(config.out, "dpo", "model.pt")
    if not os.path.exists(path) or not os.path.exists(os.path.join(config.out, "dpo", "metrics.json")):
        return None
    saved = P.load_weights_only(path, "checkpoint")
    if saved.get("train_config") != dataclasses.asdict(config):
        return None
    print(f"on_policy: {config.out}: finished before with this config; its metrics read back")
    with open(os.path.join(config.out, "dpo", "metrics.json")) as f:
        return json.load(f)


def one_run(s, source, loss, seed, sampled):
    """One dpo.py run of a setting and seed. The on-policy RPO run trains on the pairs the on-policy
    DPO run of its seed sampled (the same start model, seed and settings would sample them again),
    read back as --data, and is charged that run's sampling. -> its measured figures"""
    run = f"{source.split()[0].replace('-', '_')}_{loss.split()[0].lower()}/seed{seed}"
    flags = {**SOURCES[source], **LOSSES[loss], **({"max_pairs": 24} if s["quick"] else {})}
    if s["quick"] and "pairs" in flags:
        flags["samples_per_prompt"] = 2
    reuse = source == "on-policy" and loss != "DPO"
    if reuse:
        flags = {k: v for k, v in flags.items() if k not in ("pairs", "samples_per_prompt")}
        flags["data"] = sampled[seed][0]
    config = common.dpo_config(s, run, seed=seed, **flags)
    m = done_before(config) or dpo.train(config)
    if source == "on-policy" and not reuse:
        sampled[seed] = (os.path.join(s["dir"], run, "dpo", "pairs_round1.jsonl"), m["sampling"])
    if reuse:
        m["sampling"] = sampled[seed][1]
        m["total_wall_seconds"] += m["sampling"]["seconds"]
    return {**measured(m), "seed": seed}


def table(runs):
    """A row per setting: the median over the seeds run so far and its range, and in how many seeds
    the greedy accuracy stayed within 1 point of SFT's."""
    rows = []
    for name, rs in runs.items():
        row = {"setting": name, "seeds": len(rs)}
        for k in MEASURES:
            values = [r[k] for r in rs]
            row[k] = f"{statistics.median(values):.3g}" + (f" ({min(values):.3g} to {max(values):.3g})"
                                                           if len(values) > 1 else "")
        kept = sum(r["greedy_accuracy_policy"] >= r["greedy_accuracy_ref"] - 0.01 for r in rs)
        row["greedy_kept"] = f"{kept} of {len(rs)}"
        rows.append(row)
    return rows


def main(argv=None):
    args = common.parse_args(__doc__, argv)
    s = common.setup("on_policy", args)
    seeds = SEEDS[:1] if s["quick"] else SEEDS
    runs = {f"{source}, {loss}": [] for source in SOURCES for loss in LOSSES}
    sampled = {}

    def draw(plt):
        for name, rs in runs.items():
            plt.scatter([r["greedy_accuracy_policy"] for r in rs], [r["win_rate"] for r in rs], label=name,
                        alpha=0.7, marker="o" if "DPO" in name else "^")
        plt.axvline(runs["off-policy, DPO"][0]["greedy_accuracy_ref"], color="gray", linestyle="--",
                    label="SFT's greedy accuracy")
        plt.xlabel("greedy accuracy (held-out problems)")
        plt.ylabel("judge win rate against SFT")
        plt.legend(fontsize=7)

    for seed in seeds:  # a seed at a time, the results rewritten after each: a cut run keeps its seeds
        for source in SOURCES:
            for loss in LOSSES:
                runs[f"{source}, {loss}"].append(one_run(s, source, loss, seed, sampled))
        sft_greedy = runs["off-policy, DPO"][0]["greedy_accuracy_ref"]
        common.write_results(s, {"rows": table(runs), "runs": runs, "sft_greedy_accuracy": sft_greedy,
                                 "seeds": seeds[: seeds.index(seed) + 1]},
                             ["setting", "seeds", *MEASURES, "greedy_kept"],
                             f"Off-policy, on-policy and online DPO from the same SFT model (greedy accuracy "
                             f"{sft_greedy:.1%}): medians over {seeds.index(seed) + 1} seeds")
        common.plot(s, draw)
    return runs


if __name__ == "__main__":
    common.run(main)
