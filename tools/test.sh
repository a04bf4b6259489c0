#!/usr/bin/env bash
# README's second command: install everything, then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
ruff check senseflow tools tests scripts_flux scripts_sd35 scripts_sdxl
lint-imports          # the layer contracts of pyproject.toml (trainer > method > models > core)
mypy senseflow
python -m pytest -q tests "$@"
