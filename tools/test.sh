#!/usr/bin/env bash
# Install (tools/setup.sh), then lint, check the import layers, build the docs strictly and run the
# whole test suite in parallel. CI's .ci/run calls this. Arguments go to pytest, e.g.
#   bash tools/test.sh -m "not slow"      # the fast layer
# SDGRAPH_TEST_WORKERS sets pytest-xdist's worker count (default: auto = one per core; 0 = no xdist).
# The optional Neural Engine runtime env (.venv-ne) is created too, so its tests run where the
# engine's runtime can; on a CPU it cannot run on, those tests report why they are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
bash tools/setup_browser.sh
if [ "${SDGRAPH_SKIP_NE_ENV:-0}" != "1" ]; then
  bash tools/setup_neural_engine.sh || echo "tools/test.sh: Neural Engine runtime env not usable here (see above); its runtime tests will say why"
fi
echo "tools/test.sh: ruff"
.venv/bin/ruff check .
echo "tools/test.sh: import layers"
.venv/bin/lint-imports --no-cache
echo "tools/test.sh: docs (mkdocs build --strict)"
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet -d "$site"
echo "tools/test.sh: pytest"
workers="${SDGRAPH_TEST_WORKERS:-auto}"
xdist=()
[ "$workers" != "0" ] && xdist=(-n "$workers" --dist loadfile)
rc=0
.venv/bin/python -m pytest -q -p no:cacheprovider ${xdist[@]+"${xdist[@]}"} "$@" || rc=$?
if [ "$rc" = 5 ]; then
  echo "tools/test.sh: pytest collected no tests (exit 5): that is a failure" >&2
fi
exit "$rc"
