#!/usr/bin/env bash
# Fetch, here (where PyPI answers), the wheels that gpu_check.sh needs on a lent GPU machine and
# that its image lacks, into .whl/ (git-ignored, so the device call must carry it).
#
#   benchmarks/gpu_wheels.sh [PYTHON_VERSION]      # default 3.12, the lent machines' python3
#
# The versions are the ones installed in the project's environment (.venv, or $PYTHON), so the GPU
# run imports what the CPU tests ran; .whl/ is emptied first (two versions of a package there
# would stop the install). The lent machines (torch 2.11 image) have torch, numpy, Pillow, PyYAML, fsspec,
# safetensors and tqdm already; what they lack is pydantic (with its core and helpers), kornia and,
# for eval_device.py's retrieval, faiss (with packaging, which it imports): about 28 MB.
# Then, on the device (RESULTS.md, "How to measure"; carry [".whl"]):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site:$PWD PYTHON=python3 BUDGET=540 benchmarks/gpu_check.sh /tmp/gc
set -euo pipefail

PYTHON_VERSION=${1:-3.12}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
PACKAGES=(pydantic pydantic_core annotated-types typing-inspection typing_extensions kornia kornia_rs faiss-cpu
          packaging)
mapfile -t PINS < <("$PY" - "${PACKAGES[@]}" <<'EOF'
import sys
from importlib.metadata import version

for name in sys.argv[1:]:
    print(f"{name}=={version(name)}")
EOF
)
if [ "${#PINS[@]}" -ne "${#PACKAGES[@]}" ]; then  # a package missing from $PY: mapfile hides the failure
    echo "error: $PY lacks some of ${PACKAGES[*]} (found: ${PINS[*]}); run make setup or set PYTHON" >&2
    exit 1
fi
rm -rf "$ROOT/.whl"
mkdir -p "$ROOT/.whl"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$ROOT/.whl" "${PINS[@]}"
echo "wheels for python $PYTHON_VERSION in $ROOT/.whl:"
ls "$ROOT/.whl"
