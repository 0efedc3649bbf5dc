#!/usr/bin/env bash
# Install (tools/setup.sh) and run the main job on the embedded default (ONNX Runtime):
# random-weight demo pipeline -> export -> optimize -> lower -> run -> bench -> verify.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/sdgraph demo -o "${1:-out/demo}"
