#!/usr/bin/env bash
# Create or update the virtual environment and the demo data; a no-op when nothing changed.
#   VENV (default .venv)   where the environment lives
#   TORCH (default torch==2.13.0)   the torch requirement, installed first (CPU wheel here)
#   EXTRAS (default dev)   optional dependency groups of pyproject.toml
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH=${TORCH:-torch==2.13.0}
EXTRAS=${EXTRAS:-dev}
DATA=/usr/share/datasets/fashion-mnist

# Debian packages, each only when missing: Fashion-MNIST (the demo and test data), headless
# Chromium with its driver (the web page's browser test) and a C++ compiler (torch.compile's CPU
# backend, model.compile_blocks); nothing is downloaded at run time.
APT_PACKAGES=()
[ -f "$DATA/train-images-idx3-ubyte.gz" ] || APT_PACKAGES+=(dataset-fashion-mnist)
command -v chromium >/dev/null 2>&1 || APT_PACKAGES+=(chromium)
command -v chromedriver >/dev/null 2>&1 || APT_PACKAGES+=(chromium-driver)
command -v g++ >/dev/null 2>&1 || APT_PACKAGES+=(g++)
if [ "${#APT_PACKAGES[@]}" -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
    echo "setup: installing Debian's ${APT_PACKAGES[*]}" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${APT_PACKAGES[@]}" >/dev/null
  else
    echo "setup: no apt-get here; missing ${APT_PACKAGES[*]}: put Fashion-MNIST's four *-ubyte.gz files in a" \
         "folder and pass data.source=FOLDER; install chromium and chromedriver for tests/serve/test_page_browser.py" >&2
  fi
fi

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "setup: dinoflow needs Python >= 3.11, $PYTHON is $("$PYTHON" --version)" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"

stamp="$VENV/.dinoflow-installed"
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)-$TORCH-$EXTRAS
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setup: installing into $VENV ($TORCH, extras: $EXTRAS)" >&2
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" "$TORCH"
# The rest through uv, which resolves and fetches in parallel (on 2 cores: ~15 s where pip takes ~7 min).
# uv does not look at the torch file on disk, so pip installs torch first and uv keeps it (the constraints
# pin it); its files compiled to bytecode as pip's are (tasks and ranks start many Python processes, some
# with -B); where uv cannot be had or fails, pip installs the same set.
if ! { "${PIP[@]}" "uv>=0.5,<1" \
       && "$VENV/bin/uv" pip install --quiet --compile-bytecode --python "$VENV/bin/python" \
            -c constraints.txt -e ".[$EXTRAS]"; }; then
  echo "setup: uv failed, installing with pip" >&2
  "${PIP[@]}" -c constraints.txt -e ".[$EXTRAS]"
fi
echo "$want" > "$stamp"
