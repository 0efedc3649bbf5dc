"""Benchmark deepcache end to end: s/image of the plain pipeline vs deepcache N=3 and N=5, side by side.

One process: the plain model dir and one ``deepcache{interval=N}`` dir per interval (the UNet only is
optimized; the other submodels are copied), on ONNX Runtime (model dirs as they are) and OpenVINO
(each dir lowered). Every pipeline is loaded and warmed up first (a two-step image), then ``--repeats``
rounds time one image per pipeline, the order rotating each round so that load drift on a shared
machine hits all of them. Each deepcache image is compared with the plain image of the same target,
prompt and seed by sdgraph verify's PSNR and SSIM (``sdgraph.pipeline.verify``).

    python tools/bench_deepcache.py --src /tmp/sdgraph-full/sd15-onnx --px 512 --steps 20   # the issue's setting
    python tools/bench_deepcache.py --size tiny --px 128 --steps 20 --targets ort,openvino   # minutes, on the demo

Without ``--src`` the demo pipeline of ``--size`` is built and exported into ``--work`` (reused when present).
Prints one JSON object (and writes it to ``--json``), plus the CPU flags that matter for the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import cpu_flags, demo_export, emit_report  # noqa: E402  (tools/ helpers)

PROMPT = "a photo of an astronaut riding a horse on mars"


def source_dir(args) -> Path:
    return args.src or demo_export(args.work, args.size, args.px)


def variants(src: Path, args) -> dict[str, Path]:
    from sdgraph.passes.manager import optimize_path

    dirs = {"plain": src}
    for n in args.intervals:
        out = args.work / f"deepcache{n}-b{args.branch}-{args.schedule}"
        if not (out / "sdgraph.json").is_file():
            optimize_path(src, f"deepcache{{interval={n} branch={args.branch} schedule={args.schedule}}}", out,
                          submodels=["unet"])
        dirs[f"deepcache N={n}"] = out
    return dirs


def lowered(dirs: dict[str, Path], target: str, args) -> dict[str, Path]:
    if target == "ort":
        return dirs
    from sdgraph.targets import lower

    out = {}
    for name, d in dirs.items():
        dst = args.work / f"{d.name}-{target}"
        if not (dst / "sdgraph.json").is_file():
            lower(d, target, dst, submodels=["text_encoder", "unet", "vae_decoder"])
        out[name] = dst
    return out


def run_target(dirs: dict[str, Path], target: str, args) -> dict[str, dict]:
    import numpy as np

    from sdgraph.pipeline.runner import open_pipeline
    from sdgraph.pipeline.verify import psnr, ssim

    kw = dict(steps=args.steps, seed=args.seed, height=args.px, width=args.px, scheduler=args.scheduler)
    pipes = {name: open_pipeline(d) for name, d in dirs.items()}
    images, calls = {}, {}
    for p in pipes.values():  # warm-up (two steps: a full and, for deepcache, a shallow call): compile, caches, allocations
        p.generate(PROMPT, **dict(kw, steps=2))
    times: dict[str, list[float]] = {name: [] for name in pipes}
    order = list(pipes)
    for r in range(args.repeats):
        for name in order[r % len(order):] + order[:r % len(order)]:
            t0 = time.perf_counter()
            g = pipes[name].generate(PROMPT, **kw)
            times[name].append(time.perf_counter() - t0)
            images.setdefault(name, g.images[0])  # the same prompt and seed every round: one image each
            calls.setdefault(name, {v: g.unet_calls.count(v) for v in sorted(set(g.unet_calls))})
    base = statistics.median(times["plain"])
    ref = np.asarray(images["plain"])
    out = {}
    for name in pipes:
        s = statistics.median(times[name])
        out[name] = {"s_per_image": round(s, 4), "runs": [round(x, 4) for x in times[name]],
                     "speedup": round(base / s, 3), "unet_calls": calls[name],
                     "psnr": None if name == "plain" else round(psnr(ref, np.asarray(images[name])), 2),
                     "ssim": None if name == "plain" else round(ssim(ref, np.asarray(images[name])), 4)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, help="an exported model dir (default: build the demo pipeline of --size)")
    ap.add_argument("--size", default="tiny", choices=["tiny", "full"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/sdgraph-bench-deepcache"))
    ap.add_argument("--px", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scheduler", default="ddim")
    ap.add_argument("--intervals", type=lambda s: [int(x) for x in s.split(",")], default=[3, 5])
    ap.add_argument("--branch", type=int, default=0)
    ap.add_argument("--schedule", default="uniform", choices=["uniform", "quadratic"])
    ap.add_argument("--targets", default="ort", help="comma-separated: ort,openvino")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dirs = variants(source_dir(args), args)
    report = {"date": time.strftime("%Y-%m-%d"), "cpu_flags": cpu_flags(), "px": args.px, "steps": args.steps,
              "repeats": args.repeats, "branch": args.branch, "schedule": args.schedule,
              "source": str(args.src or f"demo sd15 {args.size}"), "targets": {}}
    for target in [t.strip() for t in args.targets.split(",") if t.strip()]:
        report["targets"][target] = run_target(lowered(dirs, target, args), target, args)
        print(json.dumps({target: report["targets"][target]}), flush=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    emit_report(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
