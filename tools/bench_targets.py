"""Benchmark `sdgraph lower` per target on one submodel: lower time, load + first call, steady call.

Each target's load + first call is measured in a fresh Python process (nothing warm from the
lowering), steady calls as the median of --repeat calls. Run it under the heavy-job lock:

    flock /tmp/sdgraph-heavy.lock .venv/bin/python tools/bench_targets.py /tmp/sdgraph-full/sd15-onnx/unet \
        --targets ort,openvino,torch --shape sample=1x4x64x64 --json bench-targets.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = r"""
import json, sys, time, statistics
t0 = time.perf_counter()
from sdgraph.targets import load_artifact
from sdgraph.ir import runtime
from sdgraph.ir.model import Model
import numpy as np
art_dir, src, shapes, repeat = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
t_import = time.perf_counter() - t0
m = Model.load(src)
feeds = runtime.seeded_inputs(m, 0, shapes)
del m
t1 = time.perf_counter()
art = load_artifact(art_dir)
run = art.runner()
t2 = time.perf_counter()
out = run(feeds)
t3 = time.perf_counter()
steady = []
for _ in range(repeat):
    s = time.perf_counter(); run(feeds); steady.append(time.perf_counter() - s)
np.save(sys.argv[5], next(iter(out.values())))
print(json.dumps({"load_s": t2 - t1, "first_call_s": t3 - t2, "steady_s": statistics.median(steady),
                  "steady_all_s": steady, "import_s": t_import}))
"""


def _child(art: Path, src: Path, shapes: dict, repeat: int, out_npy: Path, env: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", _CHILD, str(art), str(src), json.dumps(shapes), str(repeat), str(out_npy)],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"child failed for {art}:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="submodel folder or .onnx file (e.g. the full-size UNet)")
    ap.add_argument("--targets", default="ort,openvino,torch")
    ap.add_argument("--shape", action="append", default=[], help="NAME=DIMS (one bucket)")
    ap.add_argument("--auto-shape", action="store_true",
                    help="declare one bucket from the model: its static dims, else batch 1, 64x64 latents (512 px), 77 tokens")
    ap.add_argument("--option", action="append", default=[], help="TARGET:KEY=VALUE")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from sdgraph.ir import runtime
    from sdgraph.ir.model import Model
    from sdgraph.targets.driver import lower, parse_shape_args

    import numpy as np

    buckets = parse_shape_args(args.shape)
    if args.auto_shape and not buckets:
        buckets = [{k: dims for k, (dims, _) in runtime.input_specs(Model.load(args.src)).items()}]
    shapes = buckets[0] if buckets else {}
    opts: dict[str, dict[str, str]] = {}
    for o in args.option:
        t, _, kv = o.partition(":")
        k, _, v = kv.partition("=")
        opts.setdefault(t, {})[k] = v
    work = args.workdir or Path(tempfile.mkdtemp(prefix="sdgraph-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SDGRAPH_CACHE_DIR=str(work / "cache"))
    os.environ["SDGRAPH_CACHE_DIR"] = env["SDGRAPH_CACHE_DIR"]

    # reference: plain ONNX Runtime (optimizations off) on the same seeded inputs
    m = Model.load(args.src)
    feeds = runtime.seeded_inputs(m, 0, shapes)
    t = time.perf_counter()
    ref = runtime.run(m, feeds)
    ref_s = time.perf_counter() - t
    ref0 = next(iter(ref.values()))
    del m, ref

    results = {"src": str(args.src), "shapes": {k: list(v) for k, v in shapes.items()}, "reference_call_s": ref_s,
               "targets": {}}
    for target in [t for t in args.targets.split(",") if t]:
        art = work / f"art-{target}"
        shutil.rmtree(art, ignore_errors=True)
        topts = opts.get(target, {})
        t = time.perf_counter()
        res = lower(args.src, target, art, shapes=buckets or None, options=topts, cache=False, force=True)
        lower_s = time.perf_counter() - t
        entry = res.manifest["submodels"][next(iter(res.manifest["submodels"]))]
        child = _child(art, args.src, shapes, args.repeat, work / f"out-{target}.npy", env)
        got = np.load(work / f"out-{target}.npy")
        numbers = runtime.compare({"y": ref0}, {"y": got})["y"]
        row = {"lower_s": lower_s, **child, "options": res.manifest["options"],
               "load_first_over_steady": (child["load_s"] + child["first_call_s"]) / child["steady_s"],
               "max_rel_vs_ort": numbers["max_rel"], "cosine_vs_ort": numbers["cosine"], "timing": entry.get("timing"),
               "artifact_bytes": sum(entry.get("files", {}).values())}
        if target == "torch":
            row["compile_cold_s"] = entry.get("warmup_compile_s")
        results["targets"][target] = row
        print(json.dumps({target: row}), flush=True)
        shutil.rmtree(art, ignore_errors=True)
    base = results["targets"].get("ort", {}).get("steady_s")
    if base:
        for row in results["targets"].values():
            row["steady_vs_ort"] = row["steady_s"] / base
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
