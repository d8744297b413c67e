#!/usr/bin/env bash
# GPU check, sized for one H200 inside one 10-minute device call: `dfkd bench` at paper shapes
# (ViT-B-32, f16 VQGAN with 16384 codes, 224 px, cutn 32; random weights cost the same as trained
# ones): reference loop vs engine (eager; whole step compiled, default mode and CUDA graphs),
# FLOPs/MFU and a profile of one compiled step; then the CUDA tests. The bench comes first: it is
# what a short device lease is for, and its cosine columns already check every variant's quality.
# Distillation, loading and latency were measured on 2026-11-30 (docs/BENCHMARKS.md); add
# `--sections distill load latency` to repeat them.
# On a lent machine (PyTorch only, no package index): scripts/device_wheels.sh here first, then
#   run(command="scripts/gpu_check.sh $OUT", carry=[".device"], timeout_s=600)
# Usage: scripts/gpu_check.sh [OUT_DIR]   (OUT_DIR/gpu_check.txt, bench.json, trace_compiled_step.json.gz)
set -uo pipefail
OUT=${1:-storage/gpu_check}
if [ -x .venv/bin/python ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 PYTHONUNBUFFERED=1
if [ -d .device/whl ] && ! "$PY" -c "import open_clip, taming, pydantic, omegaconf" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/dfkd-site .device/whl/*.whl || exit 1
  export PYTHONPATH="/tmp/dfkd-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
{
  echo "# dfkd GPU check $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT/gpu_check.txt"
BENCH=(-m dfkd_assets.tools.bench --config configs/paper-smoke.yaml --cutn 32 --images 32 --batch 32 --iters 10)
# reference vs engine (eager, and the whole step compiled: default mode, then CUDA graphs), FLOPs/MFU,
# and a profile of one compiled step by kind of kernel (+ Chrome trace); a cold Inductor cache, then
# the same compile again with a warm one (what a later partition pays with a shared cache)
timeout 390 "$PY" "${BENCH[@]}" --sections synthesis flops profile --compile-modes default reduce-overhead \
  --trace "$OUT/trace_compiled_step.json" --json "$OUT/bench.json" 2>&1 | grep -v "^WARNING" | tee -a "$OUT/gpu_check.txt"
bench_rc=${PIPESTATUS[0]}
gzip -f "$OUT/trace_compiled_step.json" 2>/dev/null
# the CUDA tests only (the CPU tests run in CI): engine vs reference, compiled vs eager, bf16 vs fp32, KD
timeout 170 "$PY" -m pytest tests/test_gpu.py -p no:cacheprovider -q 2>&1 | tail -n 25 | tee -a "$OUT/gpu_check.txt"
tests_rc=${PIPESTATUS[0]}
echo "bench exit $bench_rc, gpu tests exit $tests_rc" | tee -a "$OUT/gpu_check.txt"
exit $(( tests_rc != 0 || bench_rc != 0 ))
