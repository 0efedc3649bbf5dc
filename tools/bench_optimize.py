#!/usr/bin/env python
"""Benchmark `sdgraph optimize` on a (large) model: wall time, peak RSS, and output equality.

    python tools/bench_optimize.py /tmp/sdgraph-full/sd15-onnx/unet/model.onnx --passes fold,infer,check
    python tools/bench_optimize.py MODEL --compare-onnxsim      # onnxsim side by side, same run

Each tool runs in its own child process, so peak RSS (ru_maxrss of the child) is its own.
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



def _dir_bytes(path: Path) -> int:
    folder = path.parent if path.is_file() else path
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _child(cmd: list[str]) -> tuple[float, float, int]:
    """Run cmd; return (wall seconds, peak RSS GiB of that child, exit code)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out = proc.stdout.read() if proc.stdout else ""
    err = proc.stderr.read() if proc.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        print(out[-2000:], err[-2000:], file=sys.stderr)
    return wall, usage.ru_maxrss / (1 << 20), code


_ONNXSIM = """
import sys, onnx, onnxsim
m = onnx.load(sys.argv[1])
s, ok = onnxsim.simplify(m)
onnx.save(s, sys.argv[2], save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx_data")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--passes", default="fold,infer,check")
    ap.add_argument("--compare-onnxsim", action="store_true")
    ap.add_argument("--no-run", action="store_true", help="skip the ONNX Runtime output comparison")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    size_gb = _dir_bytes(args.model) / 1e9
    work = Path(tempfile.mkdtemp(prefix="sdgraph-bench-opt-"))
    results = {"model": str(args.model), "model_gb": round(size_gb, 3), "passes": args.passes, "rows": []}
    try:
        out = work / "sdgraph"
        wall, rss, code = _child([sys.executable, "-m", "sdgraph", "optimize", str(args.model), "--passes", args.passes, "-o", str(out)])
        results["rows"].append({"tool": f"sdgraph optimize {args.passes}", "seconds": round(wall, 2), "peak_rss_gb": round(rss, 2),
                                "rss_over_model": round(rss * (1 << 30) / 1e9 / size_gb, 3), "ok": code == 0})
        if args.compare_onnxsim:
            (work / "onnxsim").mkdir()
            wall2, rss2, code2 = _child([sys.executable, "-c", _ONNXSIM, str(args.model), str(work / "onnxsim" / "model.onnx")])
            results["rows"].append({"tool": "onnxsim 0.8 (python API)", "seconds": round(wall2, 2), "peak_rss_gb": round(rss2, 2),
                                    "rss_over_model": round(rss2 * (1 << 30) / 1e9 / size_gb, 3), "ok": code2 == 0})
            shutil.rmtree(work / "onnxsim", ignore_errors=True)
        if code == 0 and not args.no_run:
            from sdgraph.ir import runtime
            from sdgraph.ir.model import Model

            ref_model = Model.load(args.model)
            feeds = runtime.seeded_inputs(ref_model, seed=0)
            ref = runtime.run(ref_model, feeds, optimize=True)
            del ref_model
            got = runtime.run(Model.load(out), feeds, optimize=True)
            results["outputs"] = runtime.worst(runtime.compare(ref, got))
            results["input_shapes"] = {k: list(v.shape) for k, v in feeds.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
