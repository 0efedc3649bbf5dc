"""Fidelity of a candidate against a reference: submodel numbers, image PSNR/SSIM, an image sheet, FID/CLIP."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from sdgraph.errors import InputError, UsageError, VerificationError
from sdgraph.progress import track

__all__ = ["psnr", "ssim", "max_pixel_diff", "compare_onnx_files", "verify_dirs", "check_thresholds",
           "side_by_side", "write_verify_dir", "compare_submodels", "clip_score", "fid", "raise_on", "DEFAULT_PROMPTS"]

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = ("a photo of an astronaut riding a horse on mars",
                   "a red bicycle in front of a castle, watercolor")


# --------------------------------------------------------------------------- image metrics
def _arr(img) -> np.ndarray:
    return np.asarray(img, dtype=np.float64)


def psnr(a, b, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical images."""
    x, y = _arr(a), _arr(b)
    if x.shape != y.shape:
        raise InputError(f"images differ in size: {x.shape} vs {y.shape}")
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range ** 2 / mse)


def _gauss_filter(x: np.ndarray, win: np.ndarray) -> np.ndarray:
    """'valid' separable Gaussian filter over the first two axes."""
    from numpy.lib.stride_tricks import sliding_window_view

    n = len(win)
    y = sliding_window_view(x, n, axis=0) @ win
    return sliding_window_view(y, n, axis=1) @ win


def ssim(a, b, data_range: float = 255.0, win_size: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004): Gaussian 11x11 window, sigma 1.5, K1=0.01, K2=0.03,
    averaged over channels; 1.0 for identical images."""
    x, y = _arr(a), _arr(b)
    if x.shape != y.shape:
        raise InputError(f"images differ in size: {x.shape} vs {y.shape}")
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    win_size = min(win_size, x.shape[0], x.shape[1])
    if win_size % 2 == 0:
        win_size -= 1
    r = np.arange(win_size) - win_size // 2
    win = np.exp(-(r ** 2) / (2 * sigma ** 2))
    win /= win.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for c in range(x.shape[2]):
        xc, yc = x[..., c], y[..., c]
        mx, my = _gauss_filter(xc, win), _gauss_filter(yc, win)
        sxx = _gauss_filter(xc * xc, win) - mx * mx
        syy = _gauss_filter(yc * yc, win) - my * my
        sxy = _gauss_filter(xc * yc, win) - mx * my
        m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
        vals.append(float(m.mean()))
    return float(np.mean(vals))


def max_pixel_diff(a, b) -> int:
    return int(np.abs(_arr(a) - _arr(b)).max())


def side_by_side(rows: Sequence[tuple[Any, Any, str]], path: str | os.PathLike) -> Path:
    """One PNG: per row reference | candidate | |difference| x4, with a caption line."""
    from PIL import Image, ImageDraw

    from sdgraph.ir.io import atomic_file

    w, h = rows[0][0].size
    cap = 14
    sheet = Image.new("RGB", (3 * w, len(rows) * (h + cap)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (ref, cand, caption) in enumerate(rows):
        y = i * (h + cap)
        diff = np.clip(np.abs(_arr(ref) - _arr(cand)) * 4, 0, 255).astype(np.uint8)
        for j, im in enumerate((ref, cand, Image.fromarray(diff))):
            sheet.paste(im, (j * w, y + cap))
        draw.text((2, y + 1), caption[: max(8, 3 * w // 6)], fill=(0, 0, 0))
    path = Path(path)
    with atomic_file(path) as tmp:
        sheet.save(tmp, format="PNG")
    from sdgraph.pipeline.runner import readable

    return readable(path)


# --------------------------------------------------------------------------- FID / CLIP (local weights only)
def clip_score(images: Sequence, prompts: Sequence[str], model_path: str | os.PathLike) -> float:
    """Mean CLIP score (100 x cosine of image and text embeddings, floored at 0) with a local CLIP model dir."""
    p = Path(model_path)
    if not p.is_dir():
        raise InputError(f"{p}: CLIP model folder not found (give a local transformers CLIPModel dir; nothing is downloaded)")
    import torch
    from transformers import CLIPModel, CLIPTokenizer

    try:
        model = CLIPModel.from_pretrained(str(p), local_files_only=True).eval()
        tok = CLIPTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as exc:
        raise InputError(f"{p}: cannot load a CLIP model and tokenizer here ({str(exc).splitlines()[0]})") from None
    size = model.config.vision_config.image_size
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    pix = np.stack([((np.asarray(im.convert("RGB").resize((size, size))) / 255.0 - mean) / std).transpose(2, 0, 1)
                    for im in images]).astype(np.float32)
    ids = tok(list(prompts), padding="max_length", truncation=True, max_length=tok.model_max_length, return_tensors="pt")
    with torch.no_grad():
        ie = model.get_image_features(pixel_values=torch.from_numpy(pix))
        te = model.get_text_features(input_ids=ids.input_ids, attention_mask=ids.attention_mask)
        ie = getattr(ie, "pooler_output", ie)
        te = getattr(te, "pooler_output", te)
        ie = ie / ie.norm(dim=-1, keepdim=True)
        te = te / te.norm(dim=-1, keepdim=True)
        score = (100.0 * (ie * te).sum(-1)).clamp(min=0)
    return float(score.mean())


def fid(ref_images: Sequence, cand_images: Sequence, model_path: str | os.PathLike) -> float:
    """Fréchet distance of features from a local TorchScript Inception (e.g. pt_inception-2015-12-05.pt).

    The module takes a float NCHW batch in [0, 255] at 299x299 and returns features (N, D).
    """
    p = Path(model_path)
    if not p.is_file():
        raise InputError(f"{p}: FID feature model not found (give a local TorchScript Inception file; nothing is downloaded)")
    import torch

    try:
        net = torch.jit.load(str(p), map_location="cpu").eval()
    except Exception as exc:
        raise InputError(f"{p}: not a TorchScript model ({str(exc).splitlines()[0]})") from None

    def feats(images):
        x = np.stack([np.asarray(im.convert("RGB").resize((299, 299))).transpose(2, 0, 1) for im in images])
        with torch.no_grad():
            f = net(torch.from_numpy(x.astype(np.float32)))
        f = f[0] if isinstance(f, (tuple, list)) else f
        return f.reshape(f.shape[0], -1).double().numpy()

    a, b = feats(ref_images), feats(cand_images)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1 = np.atleast_2d(np.cov(a, rowvar=False)) if len(a) > 1 else np.zeros((a.shape[1],) * 2)
    s2 = np.atleast_2d(np.cov(b, rowvar=False)) if len(b) > 1 else np.zeros((b.shape[1],) * 2)
    # sqrt(s1 s2) through the symmetric form s1^1/2 s2 s1^1/2 (eigh: no scipy needed).
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    ev = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_covmean = float(np.sqrt(np.clip(ev, 0, None)).sum())
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


# --------------------------------------------------------------------------- numeric comparison
def _seeded_feeds(runner, pipe, name: str, seed: int) -> dict[str, np.ndarray]:
    """Realistic inputs for one submodel: token ids of a fixed prompt, latents, timestep 500."""
    rng = np.random.default_rng(seed)
    h, w = pipe.default_size()
    feeds = {}
    for n in runner.input_names:
        shape = list(runner.input_shapes.get(n) or [])
        dtype = runner.input_dtypes.get(n, np.dtype(np.float32))
        dims = [d if isinstance(d, (int, np.integer)) and d > 0 else None for d in shape]
        if np.issubdtype(dtype, np.integer) and "time" not in n:
            tok = pipe.tokenizer_2 if name == "text_encoder_2" and pipe.tokenizer_2 else pipe.tokenizer
            ids = tok([DEFAULT_PROMPTS[0]], padding="max_length", max_length=tok.model_max_length,
                      truncation=True, return_tensors="np").input_ids
            feeds[n] = ids.astype(dtype)
            continue
        if "time_ids" in n:
            feeds[n] = np.array([[h, w, 0, 0, h, w]], dtype=dtype)
            continue
        if "timestep" in n or n == "t":
            feeds[n] = np.full([d or 1 for d in dims], 500, dtype=dtype) if dims else np.asarray(500, dtype=dtype)
            continue
        if len(dims) == 4:  # image or latent: batch 1, channels known, spatial from the default size
            c = dims[1] or 4
            scale = 1 if c == 3 else 8
            dims = [dims[0] or 1, c, dims[2] or h // scale, dims[3] or w // scale]
        elif len(dims) == 3:
            dims = [dims[0] or 1, dims[1] or 77, dims[2] or 768]
        else:
            dims = [d or 1 for d in dims]
        feeds[n] = rng.standard_normal(dims).astype(dtype)
    return feeds


def compare_onnx_files(ref: str | os.PathLike, cand: str | os.PathLike, seed: int = 0) -> dict[str, dict[str, float]]:
    """Run two single .onnx files in ONNX Runtime on the same seeded inputs; per-output numbers."""
    from sdgraph.ir.runtime import compare, seeded_inputs
    from sdgraph.pipeline.runner import OrtRunner

    ref, cand = Path(ref), Path(cand)
    for p in (ref, cand):
        if not p.is_file():
            raise InputError(f"{p}: no such file")
    a, b = OrtRunner(ref), OrtRunner(cand)
    if set(a.input_names) != set(b.input_names):
        raise InputError(f"inputs differ: {', '.join(a.input_names)} vs {', '.join(b.input_names)}")
    feeds = seeded_inputs(ref, seed)
    feeds = {k: v.astype(b.input_dtypes.get(k, v.dtype)) for k, v in feeds.items()}
    ra, rb = a(feeds), b(feeds)
    common = {k: v for k, v in ra.items() if k in rb}
    if not common:
        raise InputError(f"no output names in common: {', '.join(ra)} vs {', '.join(rb)}")
    return compare(common, rb)


def compare_submodels(pr, pc, names: Sequence[str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """One call of each submodel (``names``: only those) of two open pipelines on the same seeded inputs.

    Returns ``({submodel: {"outputs": per-output numbers, "worst": worst numbers}}, notes)``.
    """
    from sdgraph.ir.runtime import compare, worst

    out: dict[str, Any] = {}
    notes: list[str] = []
    for name in track(list(pr.instances), "verify submodels"):
        if names is not None and name not in names:
            continue
        if name not in pc.instances:
            notes.append(f"{name}: only in the reference, not compared")
            continue
        ra, rc = pr.instances[name][0], pc.instances[name][0]
        feeds = _seeded_feeds(ra, pr, name, seed=0)
        cfeeds = feeds
        if set(rc.input_names) != set(ra.input_names) and len(rc.input_names) == len(ra.input_names):
            # a runtime renamed an input (e.g. a folded timestep path): match the inputs by position
            cfeeds = {nc: feeds[na] for na, nc in zip(ra.input_names, rc.input_names)}
            notes.append(f"{name}: candidate inputs {rc.input_names} matched by position to {ra.input_names}")
        try:
            outs_a = ra(feeds)
            outs_c = rc({k: v.astype(rc.input_dtypes.get(k, v.dtype)) for k, v in cfeeds.items()})
        except Exception as exc:  # noqa: BLE001 - a runner refusing the feeds is reported, not fatal
            notes.append(f"{name}: not compared ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})")
            continue
        if not set(outs_a) & set(outs_c) and len(outs_a) == len(outs_c):
            outs_c = dict(zip(outs_a, outs_c.values()))
        per = compare({k: v for k, v in outs_a.items() if k in outs_c}, outs_c)
        out[name] = {"outputs": per, "worst": worst(per)}
    return out, notes


def _image_pairs(ref, cand, jobs: Sequence[tuple[str, int]], kw: Mapping[str, Any]) -> list[tuple]:
    """The reference and candidate image of each ``(prompt, seed)``; ``ref``/``cand`` are open pipelines or dirs
    (a Ray task gets dirs and opens them itself)."""
    from sdgraph.pipeline.runner import open_pipeline

    pr = open_pipeline(ref) if isinstance(ref, (str, os.PathLike)) else ref
    pc = open_pipeline(cand) if isinstance(cand, (str, os.PathLike)) else cand
    return [(pr.generate(p, seed=s, **kw).images[0], pc.generate(p, seed=s, **kw).images[0])
            for p, s in track(list(jobs), "verify images")]


def _pairs_on_ray(address: str, ref, cand, jobs: list[tuple[str, int]], kw: Mapping[str, Any]) -> tuple[list, dict]:
    """``_image_pairs`` as Ray tasks, one slice of the prompt x seed grid per node (each task asks a node's CPUs)."""
    from sdgraph.pipeline.ray_pool import connect, node_cpus

    ray = connect(address)
    try:
        per_node, total = node_cpus(ray)
        n = max(1, min(len(jobs), total // per_node))
        slices = [jobs[i::n] for i in range(n)]
        fn = ray.remote(num_cpus=per_node, max_retries=0)(_image_pairs)
        parts = ray.get([fn.remote(str(Path(ref).resolve()), str(Path(cand).resolve()), sl, dict(kw)) for sl in slices])
    finally:
        ray.shutdown()
    by_job = {}
    for sl, part in zip(slices, parts):
        by_job.update({job: pair for job, pair in zip(sl, part)})
    return [by_job[j] for j in jobs], {"address": address, "tasks": n, "cpus_per_task": per_node}


def verify_dirs(ref: str | os.PathLike, cand: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                prompts: Sequence[str] = DEFAULT_PROMPTS, seeds: Sequence[int] = (0,), steps: int = 10,
                height: int | None = None, width: int | None = None, guidance: float = 7.5,
                scheduler: str | None = None, image=None, strength: float = 0.8, image_guidance: float = 1.5,
                timestep_spacing: str | None = None, clip_model: str | os.PathLike | None = None,
                fid_model: str | os.PathLike | None = None,
                force: bool = False, control_image=None, control_scale: float = 1.0,
                ray: str | None = None) -> dict[str, Any]:
    """Compare a candidate model/artifact dir with a reference dir: submodels, then images end to end.

    With ``out_dir`` the sheet, the images and ``verify.json`` are committed there as one folder
    (an existing non-empty one is replaced only with ``force``). ``ray`` (``HOST:PORT`` or ``auto``):
    the images are made by Ray tasks, the prompt x seed grid split over the cluster's nodes.
    """
    from sdgraph.ir.outputs import guard_output
    from sdgraph.pipeline.runner import open_pipeline

    if not prompts or not seeds:
        raise UsageError("verify needs at least one prompt and one seed")
    if out_dir is not None:
        guard_output(out_dir, [p for p in (ref, cand, clip_model, fid_model, image, control_image)
                               if isinstance(p, (str, os.PathLike))],
                     force=force)
    pr, pc = open_pipeline(ref), open_pipeline(cand)
    report: dict[str, Any] = {"reference": str(ref), "candidate": str(cand), "submodels": {}, "images": [],
                              "notes": []}
    report["submodels"], notes = compare_submodels(pr, pc)
    report["notes"] += notes
    h, w = height or pr.default_size()[0], width or pr.default_size()[1]
    kw = dict(steps=steps, height=h, width=w, guidance=guidance, scheduler=scheduler, timestep_spacing=timestep_spacing)
    if image is not None:
        kw.update(image=image, strength=strength, image_guidance=image_guidance)
    if control_image is not None:
        kw.update(control_image=control_image, control_scale=control_scale)
    jobs = [(prompt, seed) for prompt in prompts for seed in seeds]
    if ray:
        pairs, report["ray"] = _pairs_on_ray(ray, ref, cand, jobs, kw)
    else:
        pairs = _image_pairs(pr, pc, jobs, kw)
    rows, ref_imgs, cand_imgs, caps = [], [], [], []
    for (prompt, seed), (a, b) in zip(jobs, pairs):
        m = {"prompt": prompt, "seed": seed, "psnr": psnr(a, b), "ssim": ssim(a, b), "max_pixel_diff": max_pixel_diff(a, b)}
        report["images"].append(m)
        rows.append((a, b, f"seed {seed}  PSNR {m['psnr']:.1f} dB  SSIM {m['ssim']:.4f}  {prompt}"))
        ref_imgs.append(a)
        cand_imgs.append(b)
        caps.append(prompt)
    from sdgraph.ir.runtime import worst_of

    report["summary"] = {
        "psnr_min": worst_of((m["psnr"] for m in report["images"]), min),
        "ssim_min": worst_of((m["ssim"] for m in report["images"]), min),
        "max_pixel_diff": max(m["max_pixel_diff"] for m in report["images"]),
        "cosine_min": worst_of((s["worst"]["cosine"] for s in report["submodels"].values()), min, 1.0),
        "max_abs": worst_of((s["worst"]["max_abs"] for s in report["submodels"].values()), max, 0.0),
    }
    if clip_model is not None:
        report["clip_score"] = {"reference": clip_score(ref_imgs, caps, clip_model),
                                "candidate": clip_score(cand_imgs, caps, clip_model)}
    else:
        report["notes"].append("CLIP score: skipped (no --clip-model PATH to a local CLIP model; nothing is downloaded)")
    if fid_model is not None:
        report["fid"] = fid(ref_imgs, cand_imgs, fid_model)
    else:
        report["notes"].append("FID: skipped (no --fid-model PATH to a local TorchScript Inception; nothing is downloaded)")
    if out_dir is not None:
        report["sheet"] = str(Path(out_dir) / "verify_sheet.png")
        write_verify_dir(out_dir, report, force=force, sheet_rows=rows, images=list(zip(ref_imgs, cand_imgs)))
    return report


def write_verify_dir(out_dir: str | os.PathLike, report: Mapping[str, Any], force: bool = False,
                     sheet_rows: Sequence | None = None, images: Sequence = ()) -> Path:
    """One folder committed at once: ``verify.json``, and for image runs the sheet and each image pair."""
    import json

    from sdgraph.ir.outputs import atomic_dir

    with atomic_dir(out_dir, force=force) as tmp:
        if sheet_rows:
            side_by_side(sheet_rows, tmp / "verify_sheet.png")
        for i, (a, b) in enumerate(images):
            a.save(tmp / f"ref_{i:03d}.png")
            b.save(tmp / f"cand_{i:03d}.png")
        (tmp / "verify.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return Path(out_dir)


def check_thresholds(report: Mapping[str, Any], *, min_psnr: float | None = None, min_ssim: float | None = None,
                     max_pixel: int | None = None, min_cosine: float | None = None,
                     max_abs: float | None = None) -> list[str]:
    """The failed thresholds, one line each (empty: all passed)."""
    fails = []
    s = report.get("summary", {})

    def bad(key: str, limit: float | None, lower_is_bad: bool) -> bool:
        """NaN (and an infinity on the wrong side) fails every threshold; a comparison would drop it."""
        if limit is None or key not in s:
            return False
        x = float(s[key])
        if x != x:
            return True
        return x < limit if lower_is_bad else x > limit

    if bad("psnr_min", min_psnr, True):
        fails.append(f"PSNR {s['psnr_min']:.2f} dB < {min_psnr}")
    if bad("ssim_min", min_ssim, True):
        fails.append(f"SSIM {s['ssim_min']:.4f} < {min_ssim}")
    if bad("max_pixel_diff", max_pixel, False):
        fails.append(f"max pixel difference {s['max_pixel_diff']} > {max_pixel}")
    if bad("cosine_min", min_cosine, True):
        fails.append(f"cosine {s['cosine_min']:.6f} < {min_cosine}")
    if bad("max_abs", max_abs, False):
        fails.append(f"max abs {s['max_abs']:.3g} > {max_abs}")
    return fails


def raise_on(fails: list[str]) -> None:
    if fails:
        raise VerificationError("verify failed: " + "; ".join(fails))

