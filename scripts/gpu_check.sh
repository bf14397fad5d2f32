#!/usr/bin/env bash
# The GPU check, in one go (about 8 minutes on one H100; nothing here needs the network):
#   1. the CUDA path of the test suite (tests/test_gpu_recipe.py's cuda tests);
#   2. the default pipeline, stage by stage: python dpo.py, then python rlvr.py;
#   3. the GPU recipe: python dpo.py --preset gpu, then python rlvr.py --preset gpu;
#   4. the DPO stage with --compile and without, from the same SFT model;
# after each step, every stage's time, throughput and MFU so far (against the card's bf16 peak) in
# $OUT/gpu_check.json and a table in $OUT/gpu_check.md (scripts/gpu_summary.py).
#
#     bash scripts/gpu_check.sh                  (writes under $OUT, default out/gpu_check)
#     BUDGET=300 bash scripts/gpu_check.sh       (no step begins after 300 s)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
BUDGET=${BUDGET:-480}  # seconds after which the steps not yet begun are skipped (a device call ends at 600)
SECONDS=0
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt" || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"

stage() {  # stage NAME COMMAND...: run it, its wall time into $OUT/times.txt, its output into $OUT/NAME.log,
  # then the figures so far (a run cut short keeps the stages it finished); past $BUDGET seconds, skipped
  local name=$1; shift
  if (( SECONDS > BUDGET )); then echo "$name skipped" | tee -a "$OUT/times.txt"; return; fi
  local t0=$(date +%s.%N)
  "$@" > "$OUT/$name.log" 2>&1 || { echo "$name failed: see $OUT/$name.log"; tail -5 "$OUT/$name.log"; }
  echo "$name $(python -c "print(round($(date +%s.%N) - $t0, 1))")" | tee -a "$OUT/times.txt"
  python scripts/gpu_summary.py "$OUT" > /dev/null
}

: > "$OUT/times.txt"
stage tests python -m pytest -q tests/test_gpu_recipe.py
stage default_dpo python dpo.py --out "$OUT/default" --no-report
stage default_rlvr python rlvr.py --out "$OUT/default" --no-report
stage gpu_dpo python dpo.py --preset gpu --out "$OUT/gpu" --no-report
stage gpu_rlvr python rlvr.py --preset gpu --out "$OUT/gpu" --no-report
stage eager_dpo python dpo.py --init "$OUT/default/sft/model.pt" --eval-problems 0 --out "$OUT/eager" --no-report
stage compile_dpo python dpo.py --init "$OUT/default/sft/model.pt" --eval-problems 0 --compile --out "$OUT/compile" --no-report

python scripts/gpu_summary.py "$OUT"
echo "gpu_check: done in $SECONDS s; figures in $OUT/gpu_check.json, the table in $OUT/gpu_check.md"
