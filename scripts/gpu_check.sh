#!/usr/bin/env bash
# GPU check, sized for one H200 in under 8 minutes: the CUDA tests (incl. configs/paper-smoke.yaml
# end to end) and a short synthesis throughput measurement at paper shapes, fp32 vs bf16.
# Usage: scripts/gpu_check.sh [OUT_DIR]   (numbers in OUT_DIR/gpu_check.txt and OUT_DIR/bench.json)
set -euo pipefail
OUT=${1:-storage/gpu_check}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1
{
  echo "# dfkd GPU check $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} | tee "$OUT/gpu_check.txt"
set +e
timeout 360 "$PY" -m pytest -m gpu -p no:cacheprovider -q 2>&1 | tail -n 25 | tee -a "$OUT/gpu_check.txt"
tests_rc=${PIPESTATUS[0]}
timeout 150 "$PY" -m dfkd_assets.bench --batch 8 32 --iters 10 --precision fp32 bf16 --json "$OUT/bench.json" 2>&1 | tee -a "$OUT/gpu_check.txt"
bench_rc=${PIPESTATUS[0]}
echo "gpu tests exit $tests_rc, bench exit $bench_rc" | tee -a "$OUT/gpu_check.txt"
exit $(( tests_rc != 0 || bench_rc != 0 ))
