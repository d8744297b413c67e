#!/usr/bin/env bash
# Wheels for a lent GPU machine: it has PyTorch (2.11, Python 3.12), timm and the Hugging Face
# stack, but not the core's other dependencies, and it reaches no package index. This downloads
# them, at the versions this project's venv tests, into .device/whl (kept out of git through
# .git/info/exclude); scripts/gpu_check.sh installs them from there when it finds them.
# Then, with the device tool: run(command="scripts/gpu_check.sh $OUT", carry=[".device"], timeout_s=600).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PYVER=${DEVICE_PYTHON_VERSION:-3.12}
PKGS=(open_clip_torch taming-transformers-rom1504 ftfy wcwidth pydantic pydantic_core annotated-types
      typing-inspection typing_extensions omegaconf antlr4-python3-runtime)
pins=()
for p in "${PKGS[@]}"; do  # the venv's exact versions: what CI tests is what the device runs
  v=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p") \
    || { echo "device_wheels: $p is not installed in $PY (run make install first)" >&2; exit 1; }
  pins+=("$p==$v")
done
rm -rf .device/whl && mkdir -p .device/whl
grep -qxF "/.device/" .git/info/exclude 2>/dev/null || echo "/.device/" >> .git/info/exclude
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest .device/whl --python-version "$PYVER" \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any "${pins[@]}"
ls .device/whl && du -sh .device/whl
