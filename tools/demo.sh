#!/usr/bin/env bash
# README's first command: install into .venv, then distil the embedded digits teacher into a 4-step student on
# the CPU (≈ 10 minutes on 2 cores). Results: demo_out/grids.png (student | teacher 28-step), demo_out/metrics.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
. .venv/bin/activate
senseflow demo --out demo_out "$@"
