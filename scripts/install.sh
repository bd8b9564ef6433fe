#!/usr/bin/env bash
# Creates .venv with the pinned stack (idempotent: a stamp records what was installed).
# Order matters: torch, then the fbgemm variant for this host, then torchrec --no-deps
# (its metadata asks for the CUDA fbgemm-gpu, which would replace the CPU build), then
# torchrec's small deps, then the project.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=.venv
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  FBGEMM="fbgemm-gpu==1.8.0"
else
  FBGEMM="fbgemm-gpu-cpu==1.8.0"
fi
STAMP_KEY=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)-$FBGEMM
STAMP=$VENV/.feedpipe-installed
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_KEY" ]; then
  exit 0
fi
echo "installing the feedpipe stack into $VENV ($FBGEMM)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip -q --disable-pip-version-check"
$PIP install --upgrade pip 2>&1 | grep -v "is ignored" || true
pipi() { $PIP install "$@" 2>&1 | grep -v -E "is ignored|dependency resolver|requires fbgemm-gpu|requires torchmetrics" || true; }
pipi "torch==2.13.0" "$FBGEMM"
pipi --no-deps "torchrec==1.8.0"
pipi "tensordict" "torchmetrics==1.0.3" "pyre-extensions" "tqdm" "iopath" "typing-inspect"
pipi -e ".[dev,examples]"
# Fail loudly here rather than at the first import in a test.
"$VENV/bin/python" -c "import torch, fbgemm_gpu, torchrec, dagster, dagster_postgres, polars, pgserver" \
  || { echo "install check failed" >&2; exit 1; }
echo "$STAMP_KEY" > "$STAMP"
