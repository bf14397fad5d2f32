#!/usr/bin/env bash
# The GPU check, in one go (about 8 minutes on one H100; nothing here needs the network):
#   1. the CUDA path of the test suite (tests/test_gpu_recipe.py's cuda tests);
#   2. the default pipeline, stage by stage: python dpo.py, then python rlvr.py;
#   3. the GPU recipe: python dpo.py --preset gpu, then python rlvr.py --preset gpu;
#   4. the DPO stage with --compile and without, from the same SFT model;
# then every stage's time, throughput and MFU (against the card's bf16 peak) in $OUT/gpu_check.json
# and a table in $OUT/gpu_check.md.
#
#     bash scripts/gpu_check.sh            (writes under $OUT, default out/gpu_check)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt" || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"

stage() {  # stage NAME COMMAND...: run it, its wall time into $OUT/times.txt, its output into $OUT/NAME.log
  local name=$1; shift
  local t0=$(date +%s.%N)
  "$@" > "$OUT/$name.log" 2>&1 || { echo "$name failed: see $OUT/$name.log"; tail -5 "$OUT/$name.log"; }
  echo "$name $(python -c "print(round($(date +%s.%N) - $t0, 1))")" | tee -a "$OUT/times.txt"
}

: > "$OUT/times.txt"
stage tests python -m pytest -q tests/test_gpu_recipe.py
stage default_dpo python dpo.py --out "$OUT/default" --no-report
stage default_rlvr python rlvr.py --out "$OUT/default" --no-report
stage gpu_dpo python dpo.py --preset gpu --out "$OUT/gpu" --no-report
stage gpu_rlvr python rlvr.py --preset gpu --out "$OUT/gpu" --no-report
stage eager_dpo python dpo.py --init "$OUT/default/sft/model.pt" --eval-problems 0 --out "$OUT/eager" --no-report
stage compile_dpo python dpo.py --init "$OUT/default/sft/model.pt" --eval-problems 0 --compile --out "$OUT/compile" --no-report

python - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
rows, figures = [], {"times": dict(line.split() for line in open(os.path.join(out, "times.txt")))}
for run in ("default", "gpu", "eager", "compile"):
    for stage in ("pretrain", "sft", "dpo", "rlvr"):
        path = os.path.join(out, run, stage, "metrics.json")
        if not os.path.exists(path):
            continue
        m = json.load(open(path))
        keep = {k: m.get(k) for k in ("wall_seconds", "train_seconds", "tokens_per_second", "pairs_per_second",
                                      "train_tokens_per_second", "sample_tokens_per_second", "mfu", "mfu_needed",
                                      "peak_flops", "accuracy", "greedy_accuracy_policy", "accuracy_policy",
                                      "win_rate", "pref_accuracy", "val_loss", "device") if k in m}
        if stage == "rlvr":
            keep.update({k: m[k] for k in ("accuracy_before", "accuracy_after", "pass_at_k", "kl") if k in m})
        figures[f"{run}/{stage}"] = keep
        rows.append(f"| {run} | {stage} | {keep.get('wall_seconds', 0):.1f} | "
                    f"{keep.get('tokens_per_second') or keep.get('train_tokens_per_second') or 0:,.0f} | "
                    f"{(keep.get('mfu') or 0):.1%} | {(keep.get('peak_flops') or 0) / 1e12:.0f} |")
json.dump(figures, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)
table = ["| run | stage | seconds | tokens/s | MFU | peak TFLOP/s |", "|---|---|---|---|---|---|"] + rows
open(os.path.join(out, "gpu_check.md"), "w").write("\n".join(table) + "\n")
print("\n".join(table))
PY
