"""Refit vs re-lower: the seconds to put a LoRA into a lowered UNet artifact, side by side per target.

    flock /tmp/sdgraph-heavy.lock .venv/bin/python tools/bench_refit.py [--model /tmp/sdgraph-full/sd15-onnx]
        [--pipeline /tmp/sdgraph-full/sd15] [--targets ort,openvino] [--repeats 1] [--out /tmp/sdgraph-bench-refit]

The model dir and its diffusers pipeline come from tools/build_full_model.py (full-size SD1.5 architecture,
random weights). A rank-8 LoRA on the UNet's attention projections (to_q, to_k, to_v, to_out.0, the usual
target) is made with peft (tests/lora_models.py). Per target, alternating in each repeat:

- re-lower: ``lora`` pass over the UNet (sdgraph.optimize) + ``lower`` of the fused UNet (cache off);
- refit: ``refit`` of the base artifact (lowered once before the timing).

Prints one JSON line per measurement (with the seconds to load the result: ORT session, OpenVINO blob
import) and a summary with the ratio re-lower / refit.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("/tmp/sdgraph-full/sd15-onnx"))
    ap.add_argument("--pipeline", type=Path, default=Path("/tmp/sdgraph-full/sd15"))
    ap.add_argument("--targets", default="ort,openvino")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("/tmp/sdgraph-bench-refit"))
    args = ap.parse_args(argv)

    from sdgraph.passes.manager import optimize_path
    from sdgraph.targets.driver import load_artifact, lower
    from sdgraph.targets.refit import refit
    from tests.lora_models import make_lora

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    lora = out / "attn.safetensors"
    if not lora.exists():
        make_lora(args.pipeline, lora, rank=args.rank, alpha=float(args.rank), unet_targets=["to_q", "to_k", "to_v", "to_out.0"],
                  text_targets=[])
    results: dict[str, dict[str, list[float]]] = {}
    loads: dict[tuple[str, str], list[float]] = {}
    for target in args.targets.split(","):
        base = out / f"{target}-base"
        if not base.exists():
            lower(args.model, target, base, submodels=["unet"], cache=False)
        times = results.setdefault(target, {"relower": [], "refit": []})
        for rep in range(args.repeats):
            for kind in ("relower", "refit") if rep % 2 == 0 else ("refit", "relower"):
                dst = out / f"{target}-{kind}"
                for p in (dst, out / "fused"):
                    shutil.rmtree(p, ignore_errors=True)
                t0 = time.perf_counter()
                if kind == "relower":
                    optimize_path(args.model, f"lora{{file={lora} scale=1.0}}", out / "fused", submodels=["unet"])
                    lower(out / "fused", target, dst, submodels=["unet"], cache=False)
                else:
                    refit(base, [(str(lora), 1.0)], dst)
                secs = time.perf_counter() - t0
                times[kind].append(secs)
                t0 = time.perf_counter()  # what the result costs to load (OpenVINO: blob import or compile)
                load_artifact(dst).runner("unet")
                load = time.perf_counter() - t0
                loads.setdefault((target, kind), []).append(load)
                print(json.dumps({"target": target, "kind": kind, "repeat": rep, "seconds": round(secs, 2),
                                  "load_seconds": round(load, 2)}), flush=True)
    for target, t in results.items():
        relower, fit = min(t["relower"]), min(t["refit"])
        print(f"{target}: re-lower {relower:.1f} s, refit {fit:.1f} s, ratio {relower / fit:.1f}x (best of {args.repeats}); "
              f"first load of the result: re-lowered {min(loads[target, 'relower']):.1f} s, "
              f"refitted {min(loads[target, 'refit']):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
