"""s/image with a ControlNet on ONNX Runtime and OpenVINO, side by side in one process (docs/benchmarks.md).

Builds a random-weight SD1.5-architecture ControlNet pipeline (``sdgraph demo-model --controlnet``),
exports it, lowers it to ``ort`` and ``openvino`` and benches both with ``sdgraph bench`` (the two
dirs alternate in one run; the first is the ratio's base). Defaults are the documented config
(full size, 512 px, 20 steps); ``--size tiny --height 128 --steps 4`` is what completes in minutes on
a small shared CPU.

    python tools/bench_controlnet.py -o build/bench-cn [--size full --height 512 --steps 20 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def _sdgraph(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "sdgraph", *map(str, args)], check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", type=Path, required=True, help="work folder (created)")
    ap.add_argument("--size", default="full", choices=("tiny", "full"))
    ap.add_argument("--height", type=int, default=512, help="image height = width in pixels")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup-steps", type=int, default=None, help="steps of bench's warm-up images (default: --steps)")
    ap.add_argument("--targets", default="ort,openvino")
    a = ap.parse_args(argv)
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    src, onnx = out / "sd15-cn", out / "sd15-cn-onnx"
    if not src.exists():
        _sdgraph("demo-model", "-o", src, "--arch", "sd15", "--size", a.size, "--controlnet")
    if not onnx.exists():
        _sdgraph("export", src, "-o", onnx, "--height", a.height, "--width", a.height)
    ctrl = out / "control.png"
    if not ctrl.exists():  # an edge-like image: white lines on black
        img = np.zeros((a.height, a.height, 3), np.uint8)
        img[:: max(1, a.height // 16)] = 255
        img[:, :: max(1, a.height // 12)] = 255
        Image.fromarray(img).save(ctrl)
    dirs = []
    for t in a.targets.split(","):
        art = out / f"cn-{t}"
        if not art.exists():
            _sdgraph("lower", onnx, "--target", t, "-o", art)
        dirs.append(art)
    report = out / "bench.json"
    warm = ["--warmup-steps", a.warmup_steps] if a.warmup_steps else []
    _sdgraph("bench", *dirs, "--steps", a.steps, "--repeats", a.repeats, *warm, "--control-image", ctrl,
             "--json-out", report, "--force")
    data = json.loads(report.read_text())
    for r in data["results"]:
        if "error" in r:
            print(f"{r['path']}: {r['error']}")
            continue
        print(f"{Path(r['path']).name}: {r['e2e_s']:.3f} s/image ({r['ratios']['e2e_speedup']:.2f}x), "
              f"controlnet {r['submodel_ms'].get('controlnet', 0):.1f} ms/call, unet {r['submodel_ms'].get('unet', 0):.1f} ms/call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
