#!/usr/bin/env bash
# GPU check, sized for one H200 in under 9 minutes: the CUDA tests of the core, then `dfkd bench`
# at paper shapes (ViT-B-32, f16 VQGAN with 16384 codes, 224 px, cutn 32; random weights cost the
# same as trained ones): reference loop vs engine, FLOPs/MFU, distillation, loading, latency; and
# a second, separate run of the synthesis section with torch.compile (its warm-up can be long, so
# it cannot cost the other numbers).
# Usage: scripts/gpu_check.sh [OUT_DIR]   (OUT_DIR/gpu_check.txt, bench.json, bench_compile.json)
set -uo pipefail
OUT=${1:-storage/gpu_check}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 PYTHONUNBUFFERED=1
{
  echo "# dfkd GPU check $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT/gpu_check.txt"
timeout 150 "$PY" -m pytest tests/test_gpu.py tests/test_synthesis.py tests/test_distill.py tests/test_augment.py \
  -p no:cacheprovider -q -x 2>&1 | tail -n 25 | tee -a "$OUT/gpu_check.txt"
tests_rc=${PIPESTATUS[0]}
BENCH=(-m dfkd_assets.bench --config configs/paper-smoke.yaml --cutn 32 --images 32 --batch 32 --iters 10)
timeout 240 "$PY" "${BENCH[@]}" --distill-images 1024 --distill-batch 256 --json "$OUT/bench.json" 2>&1 \
  | grep -v "^WARNING" | tee -a "$OUT/gpu_check.txt"
bench_rc=${PIPESTATUS[0]}
timeout 180 "$PY" "${BENCH[@]}" --sections synthesis --compile --json "$OUT/bench_compile.json" 2>&1 \
  | grep -v "^WARNING" | tail -n 12 | tee -a "$OUT/gpu_check.txt"
compile_rc=${PIPESTATUS[0]}
echo "gpu tests exit $tests_rc, bench exit $bench_rc, compile bench exit $compile_rc" | tee -a "$OUT/gpu_check.txt"
exit $(( tests_rc != 0 || bench_rc != 0 ))
