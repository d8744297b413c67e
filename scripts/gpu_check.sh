#!/usr/bin/env bash
# GPU check, sized for one H200 in under 10 minutes: the CUDA tests of the core, then `dfkd bench`
# at paper shapes (ViT-B-32, f16 VQGAN with 16384 codes, 224 px, cutn 32; random weights cost the
# same as trained ones): reference loop vs engine (eager; whole step compiled, default mode and CUDA
# graphs), FLOPs/MFU and a profile of one compiled step. Distillation, loading and latency were
# measured on 2026-11-30 (docs/BENCHMARKS.md); add `--sections distill load latency` to repeat them.
# Usage: scripts/gpu_check.sh [OUT_DIR]   (OUT_DIR/gpu_check.txt, bench.json, trace_compiled_step.json.gz)
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
timeout 180 "$PY" -m pytest tests/test_gpu.py tests/test_synthesis.py tests/test_distill.py tests/test_augment.py \
  -p no:cacheprovider -q -x 2>&1 | tail -n 25 | tee -a "$OUT/gpu_check.txt"
tests_rc=${PIPESTATUS[0]}
BENCH=(-m dfkd_assets.bench --config configs/paper-smoke.yaml --cutn 32 --images 32 --batch 32 --iters 10)
# reference vs engine (eager, and the whole step compiled: default mode, then CUDA graphs), FLOPs/MFU,
# and a profile of one compiled step by kind of kernel (+ Chrome trace); a cold Inductor cache, then
# the same compile again with a warm one (what a later partition pays with a shared cache)
timeout 400 "$PY" "${BENCH[@]}" --sections synthesis flops profile --compile-modes default reduce-overhead \
  --trace "$OUT/trace_compiled_step.json" --json "$OUT/bench.json" 2>&1 | grep -v "^WARNING" | tee -a "$OUT/gpu_check.txt"
bench_rc=${PIPESTATUS[0]}
gzip -f "$OUT/trace_compiled_step.json" 2>/dev/null
echo "gpu tests exit $tests_rc, bench exit $bench_rc" | tee -a "$OUT/gpu_check.txt"
exit $(( tests_rc != 0 || bench_rc != 0 ))
