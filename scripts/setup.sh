#!/usr/bin/env bash
# Create .venv with the pinned environment (constraints.txt) and install cautious with every backend.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[all,docs]"
# timm's optimizers (a known port, tests/verify) need only torch; --no-deps keeps torchvision out
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -c constraints.txt timm
