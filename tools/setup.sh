#!/usr/bin/env bash
# Create .venv and install sdgraph with every extra. torch is pinned to the local CPU wheel:
# a looser range pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e ".[all,dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import sdgraph, torch; print('sdgraph', sdgraph.__version__, 'torch', torch.__version__)"
