#!/usr/bin/env bash
# Install (tools/setup.sh) and run the whole test suite. CI's .ci/run calls this.
# The optional Neural Engine runtime env (.venv-ne) is created too, so its tests run where the
# engine's runtime can; on a CPU it cannot run on, those tests report why they are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
bash tools/setup_browser.sh
if [ "${SDGRAPH_SKIP_NE_ENV:-0}" != "1" ]; then
  bash tools/setup_neural_engine.sh || echo "tools/test.sh: Neural Engine runtime env not usable here (see above); its runtime tests will say why"
fi
# The whole export matrix (both exporters x four archs) runs here too; unset to skip it locally.
export SDGRAPH_SLOW="${SDGRAPH_SLOW-1}"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
