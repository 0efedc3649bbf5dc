"""Documented bounds of every numeric option (docs/reliability.md prints this table).

A value outside its bound, NaN or infinite is a UsageError (exit 2) before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from sdgraph.errors import UsageError

__all__ = ["Bound", "BOUNDS", "check", "check_all", "finite"]


@dataclasses.dataclass(frozen=True)
class Bound:
    lo: float
    hi: float
    what: str
    integer: bool = False
    lo_open: bool = False  # the value must be > lo (not >=)
    multiple: int = 1

    def describe(self) -> str:
        lo = f"({self.lo:g}" if self.lo_open else f"[{self.lo:g}"
        text = f"{int(self.lo)}..{int(self.hi)}" if self.integer else f"{lo}, {self.hi:g}]"
        if self.multiple > 1:
            text += f", multiple of {self.multiple}"
        return text


_SEED_MAX = 2**32 - 1  # numpy's and diffusers' seed range

BOUNDS: dict[str, Bound] = {
    "--steps": Bound(1, 1000, "denoising steps (run, bench, verify, demo)", integer=True),
    "--seed": Bound(0, _SEED_MAX, "seed (run, optimize --verify, demo-model; verify --seeds each)", integer=True),
    # the multiple a size must be depends on the model's VAE: the pipeline checks that itself
    "--height": Bound(1, 16384, "image height in pixels (run, bench, verify, export; a multiple of the VAE factor)",
                      integer=True),
    "--width": Bound(1, 16384, "image width in pixels (run, bench, verify, export; a multiple of the VAE factor)",
                     integer=True),
    "--size": Bound(8, 8192, "demo image size in pixels", integer=True, multiple=8),
    "--guidance": Bound(0, 100, "classifier-free guidance scale (run)"),
    "--image-guidance": Bound(0, 100, "InstructPix2Pix image guidance (run)"),
    "--strength": Bound(0, 1, "img2img strength (run)", lo_open=True),
    "--eta": Bound(0, 1, "DDIM eta (run)"),
    "--control-scale": Bound(0, 10, "ControlNet conditioning scale (run, bench, verify)"),
    "--devices": Bound(1, 64, "UNet instances (run, bench)", integer=True),
    "--num-images": Bound(1, 1000, "images per prompt (run)", integer=True),
    "--repeats": Bound(1, 1000, "timed images per dir (bench, demo)", integer=True),
    "--warmup-steps": Bound(1, 1000, "denoising steps of bench's two warm-up images", integer=True),
    "--batch": Bound(1, 64, "batch size (export)", integer=True),
    "--opset": Bound(7, 23, "ONNX opset (export)", integer=True),
    "--tolerance": Bound(0, 1e6, "worst max_rel against torch (export)", lo_open=True),
    "--min-cosine": Bound(-1, 1, "verify threshold"),
    "--min-psnr": Bound(0, 1000, "verify threshold in dB"),
    "--min-ssim": Bound(-1, 1, "verify threshold"),
    "--max-abs": Bound(0, 1e30, "verify threshold"),
    "--max-pixel-diff": Bound(0, 255, "verify threshold", integer=True),
    "--prune": Bound(0, 1e6, "cache size to prune to, GB (cache)"),
    "SDGRAPH_CACHE_MAX_GB": Bound(0, 1e6, "cache bound in GB (0 or none: unbounded)"),
    "--ratio": Bound(0, 1, "fraction of tokens merged (tome-estimate)"),
    "--blocks": Bound(0, 1000, "transformer blocks merged (tome-estimate)", integer=True),
    "--max-downsample": Bound(0, 64, "downsampling limit (tome-estimate)", integer=True),
    "--trials": Bound(0, 100_000, "trials to run (tune; 0 with --resume: only the reports)", integer=True),
    "--time": Bound(1, 30 * 86400, "wall-clock limit of a study in seconds, or 30m / 2h (tune)"),
    "--cpus-per-trial": Bound(1, 4096, "CPUs one Ray trial requests (tune --ray)", integer=True),
    "--min-clip": Bound(0, 100, "CLIP score threshold (tune)"),
    "--cap": Bound(1, 1000, "time cap of a trial's image, x the fastest within budget (tune)"),
    "lora scale": Bound(-100, 100, "LoRA scale (lora pass scale=, refit --lora PATH:SCALE)"),
}


def finite(name: str, value: Any) -> float:
    """``value`` as a finite float, or a UsageError naming ``name``."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} {value!r}: expected a number") from None
    if not math.isfinite(x):
        raise UsageError(f"{name} {value!r}: must be a finite number, not NaN or infinity")
    return x


def check(name: str, value: Any) -> Any:
    """Refuse ``value`` outside ``BOUNDS[name]`` (None passes: the option was not given)."""
    if value is None:
        return value
    b = BOUNDS[name]
    x = finite(name, value)
    if b.integer and not float(x).is_integer():
        raise UsageError(f"{name} {value!r}: expected an integer")
    below = x <= b.lo if b.lo_open else x < b.lo
    if below or x > b.hi or (b.multiple > 1 and int(x) % b.multiple):
        raise UsageError(f"{name} {value!r}: must be in {b.describe()}")
    return value


def check_all(**values: Any) -> None:
    """``check_all(steps=20, seed=-1)``: keyword names map to ``--steps``, ``--seed``..."""
    for key, value in values.items():
        check("--" + key.replace("_", "-"), value)


# Pass option bounds that are not CLI flags (the pass declares them as Option(min=, max=)).
TODO_MAX_FACTOR = 8  # todo{factor=}: keys/values pooled by factor x factor; 8 leaves 1/64 of the tokens
