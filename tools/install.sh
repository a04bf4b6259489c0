#!/usr/bin/env bash
# Creates .venv (if absent) and installs the pinned requirements and the package in editable mode.
# torch is installed first on its own line: the CPU wheel here, the CUDA build on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check "torch==2.13.0"
pip install -q --disable-pip-version-check -r requirements-dev.txt -e .
