"""The whole-pipeline benchmark: every speed-up of sdgraph end to end, on ONNX Runtime and OpenVINO, one bench run.

    flock /tmp/sdgraph-heavy.lock .venv/bin/python tools/bench_e2e.py --src /tmp/sdgraph-full/sd15-onnx \\
        --work /tmp/sdgraph-e2e --steps 20 --warmup-steps 2 --repeats 1          # the full-size setting
    .venv/bin/python tools/bench_e2e.py --size tiny --work /tmp/e2e-tiny --steps 20   # minutes, on the demo

1. build: per configuration, ``sdgraph optimize --submodels unet`` (the other submodels are copied) into
   ``WORK/<config>``, then ``sdgraph lower`` to each target (``WORK/<config>-<target>``; ORT without its
   second, pre-optimized file, to keep a full-size run on one disk: it optimizes at load instead, the
   steady-state speed is the same; OpenVINO's blobs are weightless). ``plain`` is the export itself. ``--prune`` removes each optimized
   model dir once lowered. Existing folders are reused.
2. bench: ONE ``sdgraph bench`` process over every artifact, targets interleaved per configuration
   (plain-ort, plain-openvino, fusions-ort, ...), ``--json-out WORK/bench.json``, and the image each
   dir made in its timed run (``--images-out WORK/images``: one prompt and seed for all).
3. fidelity: each configuration's image against the plain image of the same target, with the PSNR and
   SSIM of ``sdgraph verify`` (``sdgraph.pipeline.verify.psnr``/``ssim``): the very images that were
   timed, not made again.

Prints a table (s/image, speed-up over plain on the same target and over plain OpenVINO fp32, UNet
calls per variant, PSNR/SSIM) and writes ``WORK/e2e.json`` with the CPU's flags.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import cpu_flags, demo_export, emit_report  # noqa: E402  (tools/ helpers)

FUSIONS = "fold,cse,fa,gn,geglu"
# configuration -> the UNet's pass pipeline ("" : the export as it is)
CONFIGS: dict[str, str] = {
    "plain": "",
    "fusions": FUSIONS,
    "tome": "fold,cse,tome,fa,gn,geglu",
    "todo": "fold,cse,todo,fa,gn,geglu",
    "deepcache3": "deepcache{interval=3}",
    "deepcache5": "deepcache{interval=5}",
    "int8": "fold,cse,qdq{method=entropy}",
    "all": "fold,cse,tome,fa,gn,geglu,deepcache{interval=5},qdq{method=entropy}",
}
LOWER_OPTIONS = {"ort": ["optimized=false"]}


def sdgraph(*args: str) -> None:
    cmd = [sys.executable, "-m", "sdgraph", "-q", *map(str, args)]
    print("+ sdgraph " + " ".join(map(str, args)), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def build(src: Path, work: Path, configs: list[str], targets: list[str], prune: bool) -> dict[str, dict[str, Path]]:
    arts: dict[str, dict[str, Path]] = {}
    for name in configs:
        passes = CONFIGS[name]
        model = src if not passes else work / name
        outs = {t: work / f"{name}-{t}" for t in targets}
        if passes and not (model / "sdgraph.json").is_file() and not all((o / "sdgraph.json").is_file() for o in outs.values()):
            sdgraph("optimize", src, "-o", model, "--submodels", "unet", "--passes", passes)
        for t, out in outs.items():
            if not (out / "sdgraph.json").is_file():
                opts = [x for o in LOWER_OPTIONS.get(t, []) for x in ("--option", o)]
                sdgraph("lower", model, "--target", t, "-o", out, "--no-cache", *opts)
        if prune and passes and model.exists():
            shutil.rmtree(model)
        arts[name] = outs
    return arts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, help="exported model dir (default: build the --size demo into --work)")
    ap.add_argument("--size", default="tiny", choices=("tiny", "full"))
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="subset of: " + ",".join(CONFIGS))
    ap.add_argument("--targets", default="ort,openvino")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup-steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--prune", action="store_true", help="remove each optimized model dir once lowered")
    ap.add_argument("--skip-bench", action="store_true", help="reuse WORK/bench.json")
    args = ap.parse_args(argv)

    configs = args.configs.split(",")
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown or "plain" not in configs:
        ap.error(f"--configs: unknown {unknown}" if unknown else "--configs must include plain (the reference)")
    targets = args.targets.split(",")
    args.work.mkdir(parents=True, exist_ok=True)
    src = args.src or demo_export(args.work, args.size)
    arts = build(src, args.work, configs, targets, args.prune)

    order = [(c, t) for c in configs for t in targets]
    bench_json = args.work / "bench.json"
    if not (args.skip_bench and bench_json.is_file()):
        extra = ["--warmup-steps", str(args.warmup_steps)] if args.warmup_steps else []
        sdgraph("bench", *[arts[c][t] for c, t in order], "--steps", args.steps, "--repeats", args.repeats,
                *extra, "--json-out", bench_json, "--images-out", args.work / "images",
                "--force")
    rep = json.loads(bench_json.read_text())
    by_path = {r["path"]: r for r in rep["results"]}

    from PIL import Image

    from sdgraph.pipeline.verify import psnr, ssim

    fidelity: dict[str, dict[str, dict]] = {}
    for t in targets:
        plain = by_path.get(str(arts["plain"][t]), {}).get("image")
        for c in configs:
            cand = by_path.get(str(arts[c][t]), {}).get("image")
            if c == "plain" or not plain or not cand:
                continue
            a, b = Image.open(plain).convert("RGB"), Image.open(cand).convert("RGB")
            fidelity.setdefault(c, {})[t] = {"psnr": psnr(a, b), "ssim": ssim(a, b)}

    rows = []
    ov_plain = by_path.get(str(arts["plain"].get("openvino")), {}).get("e2e_s")
    for c, t in order:
        r = by_path.get(str(arts[c][t]), {})
        plain = by_path.get(str(arts["plain"][t]), {}).get("e2e_s")
        row = {"config": c, "target": t, "passes": CONFIGS[c] or "(export)", "s_per_image": r.get("e2e_s"),
               "error": r.get("error"), "unet_calls": r.get("unet_calls"),
               "speedup_same_target": plain / r["e2e_s"] if plain and r.get("e2e_s") else None,
               "speedup_over_openvino_plain": ov_plain / r["e2e_s"] if ov_plain and r.get("e2e_s") else None,
               **fidelity.get(c, {}).get(t, {})}
        rows.append(row)
    print(f"{'config':<11} {'target':<9} {'s/image':>9} {'x plain':>8} {'x OV fp32':>9} {'PSNR dB':>8} {'SSIM':>7}",
          file=sys.stderr)
    for row in rows:
        def f(x, fmt):
            return format(x, fmt) if isinstance(x, (int, float)) else "-"
        print(f"{row['config']:<11} {row['target']:<9} {f(row['s_per_image'], '9.2f')} "
              f"{f(row['speedup_same_target'], '7.2f')}x {f(row['speedup_over_openvino_plain'], '8.2f')}x "
              f"{f(row.get('psnr'), '8.1f')} {f(row.get('ssim'), '7.4f')}", file=sys.stderr)
    report = {"source": str(src), "steps": args.steps, "warmup_steps": rep.get("warmup_steps"),
              "repeats": args.repeats, "seed": rep.get("seed"), "prompt": rep.get("prompt"), "cpu_flags": cpu_flags(),
              "cpu_count": rep.get("cpu_count"), "configs": CONFIGS, "rows": rows}
    emit_report(report, args.work / "e2e.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
