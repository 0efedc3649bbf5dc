"""One trial of ``sdgraph tune``: optimize, lower, the cheap check, bench, then the images' fidelity.

``run_trial`` is a plain function of plain data (a configuration dict and the settings dict) that
returns a JSON-ready dict and never raises: the local loop calls it, and a Ray worker runs the very
same function as a task. Cheap checks come first: one call of each submodel against the reference
(``verify.compare_submodels``), and a UNet whose cosine misses ``min_cosine`` prunes the trial before
any image is made. Then ``sdgraph bench`` times the artifact, and its last timed image (first prompt,
first seed) is also the candidate image whose fidelity is measured: a trial makes each image once.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

__all__ = ["Budget", "PSNR_CAP", "run_trial", "artifact_hashes"]

PSNR_CAP = 100.0  # identical images have an infinite PSNR; the study stores this instead


@dataclasses.dataclass(frozen=True)
class Budget:
    """The fidelity budget: a trial is within it when every threshold given holds."""

    min_psnr: float | None = None
    min_ssim: float | None = None
    min_cosine: float | None = None
    min_clip: float | None = None

    @property
    def primary(self) -> str:
        """The fidelity the study maximizes (its second objective)."""
        if self.min_psnr is not None or (self.min_ssim is None and self.min_cosine is None and self.min_clip is None):
            return "psnr_min"
        if self.min_ssim is not None:
            return "ssim_min"
        return "clip_score" if self.min_cosine is None else "cosine_min"

    def fails(self, metrics: Mapping[str, Any]) -> list[str]:
        from sdgraph.pipeline.verify import check_thresholds

        fails = check_thresholds({"summary": metrics}, min_psnr=self.min_psnr, min_ssim=self.min_ssim,
                                 min_cosine=self.min_cosine)
        clip = metrics.get("clip_score")
        if self.min_clip is not None and (clip is None or not clip >= self.min_clip):
            fails.append(f"CLIP score {clip} < {self.min_clip}")
        missing = [k for k, v in (("psnr_min", self.min_psnr), ("ssim_min", self.min_ssim)) if v is not None and k not in metrics]
        return fails + [f"no {k} measured" for k in missing]

    def shortfall(self, metrics: Mapping[str, Any]) -> float:
        """How far a trial is from the budget (0 within it): the worst relative miss of a threshold."""
        worst = 0.0
        for key, limit in (("psnr_min", self.min_psnr), ("ssim_min", self.min_ssim), ("cosine_min", self.min_cosine),
                           ("clip_score", self.min_clip)):
            if limit is None:
                continue
            x = metrics.get(key)
            if not isinstance(x, (int, float)) or x != x:
                return math.inf
            worst = max(worst, (limit - x) / max(abs(limit), 1e-9))
        return worst

    def describe(self) -> str:
        parts = [f"{name} >= {v}" for name, v in (("PSNR", self.min_psnr), ("SSIM", self.min_ssim),
                                                 ("cosine", self.min_cosine), ("CLIP", self.min_clip)) if v is not None]
        return ", ".join(parts) or "none"


def artifact_hashes(path: Path) -> dict[str, str]:
    """sha256 of every graph file (``*.onnx``) of an artifact, by relative path: what ``build`` must reproduce."""
    from sdgraph.manifest import file_hash

    return {str(f.relative_to(path)): file_hash(f) for f in sorted(path.rglob("*.onnx")) if f.is_file()}


_REF: dict[str, Any] = {}  # this process's open reference pipeline and its images (reused across trials)


def _reference(model_dir: str, settings: Mapping[str, Any]):
    from sdgraph.pipeline.runner import open_pipeline

    key = str(Path(model_dir).resolve())
    if _REF.get("key") != key:
        _REF.clear()
        _REF.update(key=key, pipe=open_pipeline(model_dir), images={})
    return _REF["pipe"], _REF["images"]


def _images(pipe, settings: Mapping[str, Any], height: int, width: int, skip: int = 0) -> list:
    """One image per (prompt, seed), prompts outer; the first ``skip`` pairs left out."""
    pairs = [(prompt, seed) for prompt in settings["prompts"] for seed in settings["seeds"]][skip:]
    return [pipe.generate(prompt, steps=settings["steps"], seed=seed, height=height, width=width,
                          guidance=settings["guidance"]).images[0] for prompt, seed in pairs]


def _model_identity(model_dir: str) -> str:
    """Changes when any file of the model folder does (path, size, mtime): keys the stored reference images."""
    import hashlib

    h = hashlib.sha256()
    root = Path(model_dir).resolve()
    h.update(str(root).encode())
    for f in sorted(root.rglob("*")):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _reference_images(ref, model_dir: str, settings: Mapping[str, Any], height: int, width: int) -> list:
    """The reference images, made once per study: stored as PNG (lossless) beside the trials' work folders, so a
    resumed study (``--resume``, the next slice of a ``--time`` run) or another worker on a shared path reads them
    instead of generating them again. The folder is keyed on the model folder's files and the image settings."""
    import hashlib
    import json

    from PIL import Image

    from sdgraph.ir.io import atomic_file

    pairs = [(p, s) for p in settings["prompts"] for s in settings["seeds"]]
    spec = json.dumps({"model": _model_identity(model_dir), "h": height, "w": width, "steps": settings["steps"],
                       "guidance": settings["guidance"], "pairs": pairs}, sort_keys=True)
    folder = Path(settings["work_dir"]) / f"reference-{hashlib.sha256(spec.encode()).hexdigest()[:16]}"
    files = [folder / f"{i}.png" for i in range(len(pairs))]
    if all(f.is_file() for f in files):
        try:
            return [Image.open(f).convert("RGB") for f in files]
        except OSError:
            pass  # a damaged file: made again below
    images = _images(ref, settings, height, width)
    folder.mkdir(parents=True, exist_ok=True)
    for img, f in zip(images, files):
        with atomic_file(f, force=True) as tmp:
            img.save(tmp, format="PNG")
    return images


def _candidate_images(art: Path, timed: str, settings: Mapping[str, Any], height: int, width: int) -> list:
    """The candidate's image per (prompt, seed), in ``_images``' order: the first is bench's timed image (the
    same prompt, seed, steps, size and guidance; a PNG, lossless); the others are generated now."""
    from PIL import Image

    from sdgraph.pipeline.runner import open_pipeline

    first = Image.open(timed).convert("RGB")
    if len(settings["prompts"]) * len(settings["seeds"]) == 1:
        return [first]
    return [first] + _images(open_pipeline(art), settings, height, width, skip=1)


def _one_line(exc: BaseException) -> str:
    msg = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def run_trial(model_dir: str, config: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """Evaluate one configuration; ``status`` is ``ok``, ``pruned`` (cheap check missed) or ``failed`` (with ``error``).

    ``settings``: steps, height, width, guidance, repeats, warmup_steps (of bench's two warm-up images; None:
    ``steps``), prompts, seeds, budget (Budget fields), clip_model, work_dir (temporary folders go there and are removed),
    time_limit_s (optional: a timed image still running after this long is stopped and the trial pruned).
    """
    from sdgraph.passes.manager import optimize_path
    from sdgraph.pipeline import verify
    from sdgraph.pipeline.bench import bench
    from sdgraph.pipeline.runner import open_pipeline
    from sdgraph.targets.driver import lower

    budget = Budget(**settings["budget"])
    res: dict[str, Any] = {"config": dict(config), "status": "failed", "error": None, "metrics": {}, "bench": {},
                           "verify": {}, "graph_sha256": {}, "seconds": {}, "stage": "optimize"}
    work = Path(settings["work_dir"])
    work.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="trial-", dir=work))
    t0 = time.perf_counter()
    try:
        opt, art = tmp / "opt", tmp / "art"
        optimize_path(model_dir, config["pipeline"], opt, submodels=config.get("submodels"))
        res["seconds"]["optimize"] = round(time.perf_counter() - t0, 3)
        res["stage"] = "lower"
        t1 = time.perf_counter()
        lower(opt, config["target"], art, precision=config.get("precision"), options=config.get("options") or {},
              height=settings.get("height"), width=settings.get("width"))
        res["seconds"]["lower"] = round(time.perf_counter() - t1, 3)
        res["graph_sha256"] = artifact_hashes(art)
        # 1. the cheap check: one call of each submodel against the reference, before any image
        res["stage"] = "check"
        ref, ref_images = _reference(model_dir, settings)
        cand = open_pipeline(art)
        subs, notes = verify.compare_submodels(ref, cand)
        res["verify"]["submodels"] = {k: v["worst"] for k, v in subs.items()}
        res["verify"]["notes"] = notes
        unet = subs.get("unet", {}).get("worst", {}).get("cosine")
        res["metrics"]["unet_cosine"] = unet
        res["metrics"]["cosine_min"] = min((v["worst"]["cosine"] for v in subs.values()), default=1.0)
        if budget.min_cosine is not None and (unet is None or not unet >= budget.min_cosine):
            res.update(status="pruned", error=f"UNet cosine {unet} < {budget.min_cosine} on one call: pruned before any image")
            return res
        del cand  # bench opens its own: one model in memory at a time
        # 2. the speed: sdgraph bench on the artifact (short warm-ups apart, median of the repeats); its last
        #    timed image is the candidate image of the first prompt and seed, so fidelity needs no extra image
        res["stage"] = "bench"
        h, w = settings.get("height") or ref.default_size()[0], settings.get("width") or ref.default_size()[1]
        rep = bench([art], steps=settings["steps"], height=h, width=w, repeats=settings["repeats"],
                    prompt=settings["prompts"][0], seed=settings["seeds"][0], guidance=settings["guidance"],
                    warmup_steps=settings.get("warmup_steps"), images_out=tmp / "bench-images",
                    progress=lambda m: None, time_limit_s=settings.get("time_limit_s"))
        b = rep["results"][0]
        if "stopped_s" in b:  # tune --cap: slower than the cap, so it cannot be the pick; its fidelity is not made
            res["metrics"]["e2e_s_at_least"] = round(b["stopped_s"], 3)
            res.update(status="pruned", error=f"capped: its timed image ran {b['stopped_s']:.1f} s, over the cap of "
                                              f"{b['time_limit_s']:.1f} s (--cap x the fastest trial within budget)")
            return res
        if "error" in b:
            raise RuntimeError(b["error"])
        res["bench"] = {k: b[k] for k in ("e2e_s", "e2e_s_runs", "unet_its", "unet_call_ms", "load_s", "warmup_compile_s",
                                          "warmup_cache_s", "peak_rss_mb", "submodel_ms") if k in b}
        res["metrics"]["e2e_s"] = b["e2e_s"]
        # 3. the images: fidelity against the reference images (made once per process)
        res["stage"] = "verify"
        key = (h, w, settings["steps"], tuple(settings["prompts"]), tuple(settings["seeds"]), settings["guidance"])
        if key not in ref_images:
            ref_images[key] = _reference_images(ref, model_dir, settings, h, w)
        a_imgs, b_imgs = ref_images[key], _candidate_images(art, b["image"], settings, h, w)
        images = [{"psnr": verify.psnr(a, b), "ssim": verify.ssim(a, b), "max_pixel_diff": verify.max_pixel_diff(a, b)}
                  for a, b in zip(a_imgs, b_imgs)]
        res["verify"]["images"] = images
        res["metrics"]["psnr_min"] = min(min(m["psnr"] for m in images), PSNR_CAP)
        res["metrics"]["ssim_min"] = min(m["ssim"] for m in images)
        res["metrics"]["max_pixel_diff"] = max(m["max_pixel_diff"] for m in images)
        if settings.get("clip_model"):
            caps = [p for p in settings["prompts"] for _ in settings["seeds"]]
            res["metrics"]["clip_score"] = verify.clip_score(b_imgs, caps, settings["clip_model"])
        res["fails"] = budget.fails(res["metrics"])
        res.update(status="ok", stage="done")
    except Exception as exc:  # noqa: BLE001 - a failing configuration is a result, never the end of the study
        res["error"] = _one_line(exc)
    finally:
        res["seconds"]["total"] = round(time.perf_counter() - t0, 3)
        shutil.rmtree(tmp, ignore_errors=True)
    return res
