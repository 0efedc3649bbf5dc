#!/usr/bin/env bash
# The issue-17 "done when" run: sdgraph tune on the full-size SD1.5-architecture pipeline (random
# weights), 512 px, 20 steps, >= 30 trials on ORT and OpenVINO, then the chosen recipe built and benched
# side by side with the hand-picked best configuration of docs/benchmarks.md ("The whole pipeline":
# everything on, OpenVINO fp32). The space is tools/tune_space_full.yaml (that benchmark's speed-ups).
# Hours on a 2-core machine (an INT8 trial calibrates for ~15 min unless its graph was calibrated
# before): run it on a quiet one. TIME=45m runs a slice (at most TRIALS more trials) and stops; the next
# call resumes the study; a call without TIME finishes with the build and the side-by-side bench.
# CAP=1.2 (tune --cap): a trial's timed image stops once it runs 1.2x longer than the fastest trial within
# budget so far; such a trial cannot be the pick, and the slow configurations cost minutes less.
#
#   [OUT=/tmp/sdgraph-full] [TRIALS=30] [TIME=45m] [CAP=1.2] [RAY=address] bash tools/tune_full.sh
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
TIME_ARGS=()
[ -n "${TIME:-}" ] && TIME_ARGS=(--time "$TIME")
"${SDG[@]}" tune "$M" -o "$OUT/tune-study" --space "$ROOT/tools/tune_space_full.yaml" --targets ort,openvino \
    --trials "$TRIALS" "${TIME_ARGS[@]}" --steps 20 \
    --height 512 --width 512 --repeats 1 --warmup-steps 2 --min-psnr 30 --cap "${CAP:-1.2}" "${RESUME[@]}" "${RAY_ARGS[@]}" \
    --json > "$OUT/tune-study.json" || rc=$?
if [ -n "${TIME:-}" ]; then   # a slice: TRIALS more trials at most, within TIME; call again to continue
  echo "slice done (exit ${rc:-0}); trials so far: $("$PY" -c "import json,sys; print(len(json.load(open(sys.argv[1]))['trials']))" "$OUT/tune-study/trials.json" 2>/dev/null || echo "? (no report written)")"
  exit 0
fi
[ "${rc:-0}" -eq 0 ] || exit "$rc"

# the chosen point, replayed, against the hand-picked best of the performance benchmark
"${SDG[@]}" build "$M" --recipe "$OUT/tune-study/recipe.yaml" -o "$OUT/tuned" --force
HAND="fold,cse,tome,fa,gn,geglu,deepcache{interval=5},qdq{method=entropy}"
if [ ! -d "$OUT/hand-openvino" ]; then
  "${SDG[@]}" optimize "$M" --submodels unet --passes "$HAND" -o "$OUT/hand" --force
  "${SDG[@]}" lower "$OUT/hand" --target openvino -o "$OUT/hand-openvino" --force
fi
"${SDG[@]}" bench "$OUT/hand-openvino" "$OUT/tuned" --steps 20 --height 512 --width 512 --repeats 3 --warmup-steps 2 \
    --json-out "$OUT/tune-vs-hand.json"
"${SDG[@]}" verify "$M" "$OUT/tuned" --steps 20 --height 512 --width 512 --min-psnr 30 -o "$OUT/tuned-verify" --force
echo "front: $OUT/tune-study/front.svg  recipe: $OUT/tune-study/recipe.yaml  side by side: $OUT/tune-vs-hand.json"
