"""Benchmark model/artifact dirs side by side: per-submodel latency, UNet it/s, s/image, peak RSS, warm-up."""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from sdgraph.errors import PassError, SdgraphError, TargetUnavailable, UsageError
from sdgraph.progress import track

__all__ = ["METRICS", "RssSampler", "bench", "split_results", "write_plot", "write_json"]

log = logging.getLogger(__name__)

# Every per-dir metric the JSON carries (tests check them all).
METRICS = ("load_s", "warmup_compile_s", "warmup_cache_s", "e2e_s", "e2e_s_runs", "unet_its", "unet_call_ms",
           "submodel_ms", "submodel_mb", "peak_rss_mb", "peak_rss_delta_mb", "steps", "height", "width", "target",
           "timesteps", "unet_calls")


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: fall back to the high-water mark
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RssSampler:
    """Samples this process's resident set size every ``interval`` s; ``peak`` is the largest seen.

    RSS, not tracemalloc: runtimes (ONNX Runtime, OpenVINO) allocate outside Python's allocator.
    """

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = self.start = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _release_memory() -> None:
    gc.collect()
    try:  # give freed heap back to the OS so the next dir's peak starts from a fair baseline
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _OverTime(Exception):
    """A timed image ran longer than bench's ``time_limit_s``: it was stopped at ``seconds``."""

    def __init__(self, seconds: float):
        super().__init__(f"stopped after {seconds:.1f} s")
        self.seconds = seconds


def _bench_one(path: Path, *, steps: int, height: int | None, width: int | None, repeats: int, prompt: str,
               seed: int, scheduler: str | None, guidance: float, devices: int,
               say: Callable[[str], None], extra: dict[str, Any], warmup_steps: int | None = None,
               time_limit_s: float | None = None) -> dict[str, Any]:
    from sdgraph.pipeline.runner import open_pipeline

    _release_memory()
    with RssSampler() as mem:
        kw = dict(steps=steps, height=height, width=width, seed=seed, scheduler=scheduler, guidance=guidance, **extra)
        warm_kw = {**kw, "steps": warmup_steps or steps}  # a big model's warm-up images may take fewer steps
        # 1. warm-up with compilation: load (compile) + first image, as a fresh process would see it.
        t0 = time.perf_counter()
        pipe = open_pipeline(path, devices=devices)
        load_s = time.perf_counter() - t0
        pipe.check_size(height or pipe.default_size()[0], width or pipe.default_size()[1])
        pipe.generate(prompt, **warm_kw)
        warm_compile = time.perf_counter() - t0
        say(f"{path}: warm-up with compilation {warm_compile:.2f} s (load {load_s:.2f} s)")
        del pipe
        _release_memory()
        # 2. warm-up with cache: the same again; targets reuse their compiled blobs / caches now.
        t0 = time.perf_counter()
        pipe = open_pipeline(path, devices=devices)
        pipe.generate(prompt, **warm_kw)
        warm_cache = time.perf_counter() - t0
        # 3. steady state: median of ``repeats`` images.
        runs, unet_its, unet_ms, sub_ms = [], [], [], {}
        for _ in track(range(repeats), f"bench {path.name}: timed images"):
            start = time.perf_counter()

            def over_time(_step: int) -> None:  # after each denoising step: stop an image past the limit
                elapsed = time.perf_counter() - start
                if elapsed > time_limit_s:
                    raise _OverTime(elapsed)

            g = pipe.generate(prompt, **kw, **({"callback": over_time} if time_limit_s else {}))
            image = g.images[0]
            timesteps = g.timesteps
            runs.append(g.seconds)
            u = g.stats.get("unet", {"seconds": 0.0, "calls": 0})
            unet_s = sum(s["seconds"] for name, s in g.stats.items() if name in set(g.unet_calls) | {"unet"})
            unet_calls = _calls_per_variant(g)
            unet_its.append(g.steps_run / unet_s if unet_s else 0.0)
            unet_ms.append(1000.0 * u["seconds"] / max(u["calls"], 1))
            for name, s in g.stats.items():
                sub_ms.setdefault(name, []).append(1000.0 * s["seconds"] / max(s["calls"], 1))
        h, w = height or pipe.default_size()[0], width or pipe.default_size()[1]
        target = pipe.target
        del pipe
    _release_memory()
    say(f"{path}: {statistics.median(runs):.3f} s/image")
    return {
        "path": str(path), "target": target, "steps": steps, "height": h, "width": w, "devices": devices,
        "guidance": guidance, "timesteps": timesteps,
        "load_s": load_s, "warmup_compile_s": warm_compile, "warmup_cache_s": warm_cache,
        "e2e_s": statistics.median(runs), "e2e_s_runs": runs,
        "unet_its": statistics.median(unet_its), "unet_call_ms": statistics.median(unet_ms),
        "submodel_ms": {k: statistics.median(v) for k, v in sub_ms.items()},
        "peak_rss_mb": mem.peak / 2**20, "peak_rss_delta_mb": (mem.peak - mem.start) / 2**20,
        "submodel_mb": _submodel_mb(path),
        "unet_calls": unet_calls, "_image": image,
    }


def _calls_per_variant(g) -> dict[str, int]:
    """Denoising steps per UNet variant in one image (a DeepCache dir: unet at cache steps, unet_shallow between)."""
    out: dict[str, int] = {}
    for name in g.unet_calls:
        out[name] = out.get(name, 0) + 1
    return out


# Not weights: compiled-kernel caches (OpenVINO's model.blob) and text descriptions of graphs and configs.
_NOT_WEIGHTS = (".blob", ".xml", ".json", ".yaml", ".yml", ".sh", ".txt", ".log")


def _submodel_mb(path: Path) -> dict[str, float]:
    """Weights on disk per submodel folder, in MB (OpenVINO's .bin, the engine's model.bin, ONNX's
    model.onnx + data): the size half of a size/latency table, as the OpenVINO seed compares .bin files."""
    from sdgraph.ir.modeldir import ModelDir

    return {s: sum(f.stat().st_size for f in (path / s).rglob("*")
                   if f.is_file() and f.suffix.lower() not in _NOT_WEIGHTS) / 1e6
            for s in ModelDir(path).names if (path / s).is_dir()}


def bench(dirs: Sequence[str | os.PathLike], *, steps: int = 20, height: int | None = None, width: int | None = None,
          repeats: int = 3, prompt: str = "a photo of an astronaut riding a horse on mars", seed: int = 0,
          scheduler: str | None = None, guidance: float = 7.5, devices: int = 1,
          timestep_spacing: str | None = None, image: str | os.PathLike | None = None, strength: float = 0.8,
          image_guidance: float = 1.5, progress: Callable[[str], None] | None = None,
          control_image: str | os.PathLike | None = None, control_scale: float = 1.0,
          warmup_steps: int | None = None, images_out: str | os.PathLike | None = None,
          force: bool = False, time_limit_s: float | None = None) -> dict[str, Any]:
    """Bench each dir in this one process, in order; ratios are against the first dir.

    Timings exclude warm-up: ``warmup_compile_s`` (load + first image) and ``warmup_cache_s`` (a fresh
    load + image) are reported apart from the ``repeats`` steady-state images behind ``e2e_s``; the two
    warm-up images take ``warmup_steps`` steps (default: ``steps``). ``images_out``: a folder that gets each
    dir's last timed image (``image_000.png`` for the first dir...; the same prompt and seed for all, so
    ``sdgraph.pipeline.verify.psnr``/``ssim`` compare them), replaced only with ``force``.
    ``image`` makes every image img2img (``strength``) or, on an InstructPix2Pix model, an edit.
    ``time_limit_s``: a timed image still denoising after this long is stopped (checked after each step); that
    dir's result is an error with ``stopped_s``, a lower bound of its s/image (``tune --cap``).
    """
    if not dirs:
        raise UsageError("give at least one model or artifact dir to bench")
    if steps < 1 or repeats < 1 or (warmup_steps is not None and warmup_steps < 1):
        raise UsageError("--steps, --repeats and --warmup-steps must be >= 1")
    if images_out is not None:  # refused before minutes of benchmarking, not after
        from sdgraph.ir.outputs import guard_output

        guard_output(images_out, list(dirs), force=force, what="--images-out folder")
    say = progress or (lambda m: log.info(m))
    extra: dict[str, Any] = {"timestep_spacing": timestep_spacing}
    if image is not None:
        from sdgraph.pipeline.runner import load_image

        extra.update(image=load_image(image), strength=strength, image_guidance=image_guidance)
    if control_image is not None:  # ControlNet models: the controlnet gets its own per-call row
        from sdgraph.pipeline.runner import load_image

        extra.update(control_image=load_image(control_image), control_scale=control_scale)
    results = []
    bad_input: list[SdgraphError] = []  # dirs refused for their input (exit 2), e.g. pix2pix without --image
    for d in track(dirs, "bench"):
        # One dir that fails (a runtime error mid-image, say) must not lose the others' numbers.
        try:
            results.append(_bench_one(Path(d), steps=steps, height=height, width=width, repeats=repeats,
                                      prompt=prompt, seed=seed, scheduler=scheduler, guidance=guidance,
                                      devices=devices, say=say, extra=extra, warmup_steps=warmup_steps,
                                      time_limit_s=time_limit_s))
        except _OverTime as over:
            _release_memory()
            say(f"{d}: stopped: a timed image ran {over.seconds:.1f} s, over the limit of {time_limit_s:.1f} s")
            results.append({"path": str(d), "error": f"stopped: a timed image ran {over.seconds:.1f} s, over the "
                            f"limit of {time_limit_s:.1f} s", "stopped_s": over.seconds, "time_limit_s": time_limit_s})
        except Exception as exc:  # noqa: BLE001 - recorded per dir, reported at the end
            if isinstance(exc, SdgraphError) and exc.exit_code == 2:
                bad_input.append(exc)
            _release_memory()
            msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            say(f"{d}: failed: {type(exc).__name__}: {msg}")
            results.append({"path": str(d), "error": f"{type(exc).__name__}: {msg}"})
    images = [r.pop("_image", None) for r in results]
    if images_out is not None and any(im is not None for im in images):
        from PIL import Image as PILImage

        from sdgraph.pipeline.runner import save_images

        blank = next(im for im in images if im is not None)
        paths = save_images([im if im is not None else PILImage.new("RGB", blank.size) for im in images], images_out,
                            force=force)
        for r, im, path in zip(results, images, paths):
            if im is not None:
                r["image"] = str(path)
    ok = [r for r in results if "error" not in r]
    if not ok and len(bad_input) == len(results):  # nothing ran, and only for bad input: that is the error
        raise bad_input[0]
    if not ok and not any("stopped_s" in r for r in results):  # stopped by time_limit_s: a result, not a failure
        raise PassError(f"bench: every dir failed; first: {results[0]['path']}: {results[0]['error']}")
    base = ok[0] if ok else None
    for r in ok:
        r["ratios"] = {
            "e2e_speedup": base["e2e_s"] / r["e2e_s"] if r["e2e_s"] else 0.0,
            "unet_its": r["unet_its"] / base["unet_its"] if base["unet_its"] else 0.0,
            "peak_rss": r["peak_rss_delta_mb"] / base["peak_rss_delta_mb"] if base["peak_rss_delta_mb"] > 0 else 0.0,
            "warmup_compile": r["warmup_compile_s"] / base["warmup_compile_s"] if base["warmup_compile_s"] else 0.0,
        }
    from sdgraph.manifest import package_versions

    return {"steps": steps, "warmup_steps": warmup_steps or steps, "repeats": repeats, "prompt": prompt, "seed": seed, "devices": devices,
            "guidance": guidance, "timestep_spacing": timestep_spacing,
            "image": str(image) if image is not None else None,
            "strength": strength if image is not None else None,
            "cpu_count": os.cpu_count(), "packages": package_versions(), "results": results,
            "failed": [r["path"] for r in results if "error" in r]}


def split_results(report: dict[str, Any], labels: Sequence[str] | None = None) -> tuple[list, list]:
    """``([(label, result), ...] of the dirs that ran, [(label, result), ...] of those that failed)``."""
    names = list(labels) if labels else [Path(r["path"]).name for r in report["results"]]
    named = list(zip(names, report["results"]))
    return [(n, r) for n, r in named if "error" not in r], [(n, r) for n, r in named if "error" in r]


def write_json(report: dict[str, Any], path: str | os.PathLike, force: bool = False) -> Path:
    from sdgraph.ir.io import atomic_file
    from sdgraph.pipeline.runner import readable

    path = Path(path)
    with atomic_file(path, force=force) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    return readable(path)


def write_plot(report: dict[str, Any], path: str | os.PathLike, labels: Sequence[str] | None = None,
               force: bool = False) -> Path:
    """A PNG with three panels: s/image, UNet it/s and peak RSS per dir (ratios vs the first on the bars)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TargetUnavailable("the bench plot needs matplotlib: pip install 'sdgraph[plot]'") from None
    from sdgraph.ir.io import atomic_file
    from sdgraph.pipeline.runner import readable

    ran, _ = split_results(report, labels)
    names, res = [n for n, _ in ran], [r for _, r in ran]
    panels = (("e2e_s", "end-to-end s / image", "e2e_speedup", "x faster"),
              ("unet_its", "UNet it/s", "unet_its", "x"),
              ("peak_rss_delta_mb", "peak RSS over start (MB)", "peak_rss", "x"))
    fig, axes = plt.subplots(1, 3, figsize=(4.2 * 3, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title, rkey, unit) in zip(axes, panels):
        vals = [r[key] for r in res]
        bars = ax.bar(range(len(vals)), vals, color=[colors[i % len(colors)] for i in range(len(vals))])
        for b, r in zip(bars, res):
            ax.annotate(f"{r['ratios'][rkey]:.2f}{unit}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(vals)), names, rotation=25, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"sdgraph bench: {report['steps']} steps, {res[0]['height']}x{res[0]['width']}, "
                 f"median of {report['repeats']}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path, force=force) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return readable(path)
