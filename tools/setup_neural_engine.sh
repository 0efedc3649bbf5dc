#!/usr/bin/env bash
# Create the optional Neural Engine runtime environment (.venv-ne) beside sdgraph's own venv.
# intel-extension-for-transformers 1.4.2 installs only with the pins below (see docs/targets/neural-engine.md), which
# clash with sdgraph's environment, so sdgraph talks to it through a subprocess worker
# (sdgraph/targets/ne_worker.py). Usage: tools/setup_neural_engine.sh [ENV_DIR]  (default .venv-ne)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ENV_DIR="${1:-${SDGRAPH_NE_ENV:-$ROOT/.venv-ne}}"
PY="${SDGRAPH_NE_PYTHON:-python3.11}"
start=$(date +%s)
if [ ! -x "$ENV_DIR/bin/python" ]; then
  "$PY" -m venv "$ENV_DIR"
fi
"$ENV_DIR/bin/python" -m pip install -q --upgrade "pip<25"
# The pins do not resolve as one set (transformers 4.34.1 needs tokenizers 0.14, which caps
# huggingface-hub below 0.18, while datasets 2.19.1 needs huggingface-hub >= 0.21.2), so they go in
# in stages: the stack with its dependencies, then the remaining pins and the engine wheel without
# dependency resolution. The engine's runtime (neural_engine_py) itself needs numpy and pyyaml only.
PIP=("$ENV_DIR/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" "numpy==1.26.4" "setuptools==69.5.1" "protobuf==3.20.3" "onnx==1.14.1" "pyyaml" \
  "transformers==4.34.1" "neural-compressor==2.5.1"
"${PIP[@]}" --no-deps "accelerate==0.30.1" "datasets==2.19.1" "huggingface-hub==0.23.5" "pyarrow==15.0.2" \
  "intel-extension-for-transformers==1.4.2"
"$ENV_DIR/bin/python" -c "import intel_extension_for_transformers.neural_engine_py as ne; print('neural engine runtime ok')"
echo "setup_neural_engine: $ENV_DIR ready in $(( $(date +%s) - start )) s"
