#!/usr/bin/env bash
# The issue-17 "done when" run: sdgraph tune on the full-size SD1.5-architecture pipeline (random
# weights), 512 px, 20 steps, >= 30 trials on ORT and OpenVINO, then the chosen recipe built and benched
# side by side with the hand-picked best configuration of docs/benchmarks.md (OpenVINO bf16 + tome).
# Hours on a 2-core machine: run it on a quiet one.
#
#   bash tools/tune_full.sh [OUT=/tmp/sdgraph-full] [TRIALS=30] [RAY=address]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-/tmp/sdgraph-full}"
TRIALS="${TRIALS:-30}"
PY="${PY:-$ROOT/.venv/bin/python}"
SDG=("$PY" -m sdgraph)
M="$OUT/sd15-onnx"

"$PY" "$ROOT/tools/build_full_model.py" --arch sd15 --out "$OUT"     # reused when present
grep -m1 flags /proc/cpuinfo | tr ' ' '\n' | grep -E 'avx|amx|vnni' | tr '\n' ' ' > "$OUT/tune-cpu-flags.txt"

RAY_ARGS=()
[ -n "${RAY:-}" ] && RAY_ARGS=(--ray "$RAY")
RESUME=()
[ -f "$OUT/tune-study/study.db" ] && RESUME=(--resume)          # an interrupted study continues
"${SDG[@]}" tune "$M" -o "$OUT/tune-study" --targets ort,openvino --trials "$TRIALS" --steps 20 \
    --height 512 --width 512 --repeats 1 --min-psnr 30 "${RESUME[@]}" "${RAY_ARGS[@]}" --json > "$OUT/tune-study.json"

# the chosen point, replayed, against the hand-picked best of the performance benchmark
"${SDG[@]}" build "$M" --recipe "$OUT/tune-study/recipe.yaml" -o "$OUT/tuned" --force
if [ ! -d "$OUT/openvino-bf16-tome" ]; then
  "${SDG[@]}" optimize "$M" --passes fold,tome,fa,gn -o "$OUT/sd15-tome" --force
  "${SDG[@]}" lower "$OUT/sd15-tome" --target openvino --precision bf16 -o "$OUT/openvino-bf16-tome" --force
fi
"${SDG[@]}" bench "$OUT/openvino-bf16-tome" "$OUT/tuned" --steps 20 --height 512 --width 512 --repeats 3 \
    --json-out "$OUT/tune-vs-hand.json"
"${SDG[@]}" verify "$M" "$OUT/tuned" --steps 20 --height 512 --width 512 --min-psnr 30 -o "$OUT/tuned-verify" --force
echo "front: $OUT/tune-study/front.svg  recipe: $OUT/tune-study/recipe.yaml  side by side: $OUT/tune-vs-hand.json"
