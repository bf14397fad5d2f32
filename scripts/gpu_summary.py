"""
The GPU check's figures, gathered from what scripts/gpu_check.sh has run so far: every stage's
time, throughput and MFU (against the peak the stage probed), and the figures the default and the
GPU recipe are compared on, into <out>/gpu_check.json, with a table in <out>/gpu_check.md.
gpu_check.sh runs it after every stage, so a run cut short still leaves the stages it finished.

    python scripts/gpu_summary.py OUT
"""

import json
import os
import sys

RUNS = ("default", "gpu", "eager", "compile")  # gpu_check.sh's --out directories under OUT
STAGES = ("pretrain", "sft", "dpo", "rlvr")
KEEP = ("wall_seconds", "train_seconds", "tokens_per_second", "pairs_per_second", "train_tokens_per_second",
        "sample_tokens_per_second", "mfu", "mfu_needed", "peak_flops", "accuracy", "greedy_accuracy_policy",
        "accuracy_policy", "win_rate", "pref_accuracy", "val_loss", "device", "accuracy_before", "accuracy_after",
        "pass_at_k", "kl")


def times(path):
    """gpu_check.sh's times.txt: {step: seconds, or "skipped" when the budget ran out before it}."""
    if not os.path.exists(path):
        return {}
    return {name: value if value == "skipped" else float(value)
            for name, value in (line.split() for line in open(path) if line.strip())}


def summarise(out):
    """-> (figures: {"times": ..., "run/stage": {kept metrics}}, the table's lines)"""
    figures = {"times": times(os.path.join(out, "times.txt"))}
    rows = ["| run | stage | seconds | tokens/s | MFU | MFU needed | peak TFLOP/s |", "|---|---|---|---|---|---|---|"]
    for run in RUNS:
        for stage in STAGES:
            path = os.path.join(out, run, stage, "metrics.json")
            if not os.path.exists(path):
                continue
            with open(path) as f:
                m = json.load(f)
            keep = {k: m[k] for k in KEEP if k in m}
            figures[f"{run}/{stage}"] = keep
            tokens = keep.get("tokens_per_second") or keep.get("train_tokens_per_second") or 0
            needed = f"{keep['mfu_needed']:.1%}" if "mfu_needed" in keep else "-"
            rows.append(f"| {run} | {stage} | {keep.get('wall_seconds', 0):.1f} | {tokens:,.0f} | "
                        f"{keep.get('mfu', 0):.1%} | {needed} | {keep.get('peak_flops', 0) / 1e12:.0f} |")
    return figures, rows


def main(out):
    figures, rows = summarise(out)
    for name, text in (("gpu_check.json", json.dumps(figures, indent=1)), ("gpu_check.md", "\n".join(rows) + "\n")):
        tmp = os.path.join(out, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))  # whole or not at all, even if the run is cut here
    print("\n".join(rows))


if __name__ == "__main__":
    main(sys.argv[1])
