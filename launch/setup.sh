#!/usr/bin/env bash
# One-time, idempotent set-up: a virtual environment in .venv with dimat and its dependencies.
# Reuses a torch the calling python already has (any build: CUDA, ROCm, CPU); otherwise installs
# torch==2.13.0, never an unpinned torch (that would pull gigabytes of CUDA packages).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

# pip's -q still prints one warning per missing local index folder on some machines: drop those.
pip_install() {
  "$VENV/bin/python" -m pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] reusing torch $("$PY" -c 'import torch; print(torch.__version__)') from $PY"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch==${DIMAT_TORCH_VERSION:-2.13.0}"
  pip_install "torch==${DIMAT_TORCH_VERSION:-2.13.0}"
fi
stamp="$VENV/.dimat-installed"
want=$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing dimat and its dependencies into $VENV"
  extras=dev
  # the third-party models the alignment tests build (timm, transformers, torchvision 0.28.0) are
  # pinned to torch 2.13.0; beside any other torch they are left out and those tests skip
  if "$VENV/bin/python" -c "import torch, sys; sys.exit(not torch.__version__.startswith('2.13.'))" 2>/dev/null; then
    extras=dev,test-models
  fi
  pip_install -e ".[$extras]"
  echo "$want" > "$stamp"
fi
