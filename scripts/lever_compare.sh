#!/usr/bin/env bash
# A distillation lever against its control on the same cached synthesis, seed by seed (control,
# then lever, per seed, so an interrupted run still has pairs): dfkd compare with a shared --work.
#   scripts/lever_compare.sh OUT "distill.feature_weight=1.0" [SEEDS...]
set -euo pipefail
out=$1; lever=$2; shift 2
seeds=${*:-0 1 2}
for s in $seeds; do
  .venv/bin/dfkd compare --config "${DFKD_CONFIG:-configs/demo.yaml}" --methods contrastive --seeds "$s" --out "$out/control_s$s" --work "$out/work"
  .venv/bin/dfkd compare --config "${DFKD_CONFIG:-configs/demo.yaml}" --methods contrastive --seeds "$s" --out "$out/lever_s$s" --work "$out/work" --set "$lever"
done
