#!/usr/bin/env bash
# Install (tools/setup.sh) and run the whole test suite. CI's .ci/run calls this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
