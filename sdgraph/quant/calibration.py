"""Calibration inputs that look like real Stable Diffusion use, made by the pipeline's own submodels."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Iterator

import numpy as np

from sdgraph.errors import InputError, UsageError
from sdgraph.progress import track
from sdgraph.quant.modeldir import cache_dir, load_prompts, model_dir, need
from sdgraph.quant.text import TextEncoder, tokenized_feeds

__all__ = [
    "model_dir",
    "load_prompts",
    "calibration_feeds",
    "FeedReader",
    "cache_dir",
]

log = logging.getLogger(__name__)

_GUIDANCE = 7.5
_DEFAULT_SCALING = 0.18215


def _file_key(directory: Path, subs: list[str]) -> list:
    out = []
    for sub in subs:
        d = directory / sub
        for f in sorted(d.glob("*")) if d.is_dir() else []:
            if f.is_file():
                st = f.stat()
                out.append([f"{sub}/{f.name}", st.st_size, st.st_mtime_ns])
    return out


def _fixed_batch(t) -> int | None:
    d = (t.shape or [None])[0]
    return int(d) if isinstance(d, (int, np.integer)) and d > 0 else None


def _scheduler(directory: Path, role: str):
    import diffusers

    cfg_file = need(directory, "scheduler/scheduler_config.json", role, "the scheduler config")
    try:
        cfg = json.loads(cfg_file.read_text())
        cls = getattr(diffusers, cfg["_class_name"])
        return cls.from_config(cfg)
    except (ValueError, KeyError, AttributeError) as exc:
        raise InputError(f"{cfg_file}: cannot build the scheduler ({exc})") from None


def _scaling_factor(directory: Path) -> float:
    for sub in ("vae_decoder", "vae"):
        f = directory / sub / "config.json"
        if f.is_file():
            try:
                return float(json.loads(f.read_text()).get("scaling_factor", _DEFAULT_SCALING))
            except ValueError:
                pass
    return _DEFAULT_SCALING


def _trajectories(unet, directory: Path, prompts: list[str], steps: int, n_traj: int, seed: int,
                  role: str) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray]]:
    """Run classifier-free-guided denoising; record every UNet call's feeds and the predicted x0."""
    import torch

    from sdgraph.ir import runtime as rt

    ins = {t.name: t for t in unet.graph.inputs}
    xl = "text_embeds" in ins or "time_ids" in ins
    te = TextEncoder(directory, role, xl=xl)
    sched = _scheduler(directory, role)
    specs = rt.input_specs(unet)
    sample = next((n for n in ins if n == "sample"), None) or next(n for n, (s, _) in specs.items() if len(s) == 4)
    tname = next((n for n in ins if "timestep" in n.lower()), None)
    ehs = next((n for n in ins if "encoder_hidden" in n.lower()), None)
    if tname is None or ehs is None:
        raise InputError("UNet calibration needs inputs 'timestep' and 'encoder_hidden_states'")
    batch = _fixed_batch(ins[sample]) or 2
    if batch not in (1, 2):
        raise InputError(f"UNet calibration supports batch 1 or 2 (classifier-free guidance), the graph has {batch}")
    c, h, w = specs[sample][0][1:]
    unet_sess = rt.session(unet)
    out_name = unet_sess.get_outputs()[0].name
    uncond, upool = te.encode("")
    if xl:  # diffusers' SDXL default (force_zeros_for_empty_prompt): the unconditional half is zeros
        uncond, upool = np.zeros_like(uncond), np.zeros_like(upool)
    if uncond.shape[-1] != specs[ehs][0][-1]:
        what = "text encoders' concatenated width" if xl else "text encoder width"
        raise InputError(f"{what} {uncond.shape[-1]} does not match the UNet's encoder_hidden_states "
                         f"width {specs[ehs][0][-1]}")
    # SDXL's micro-conditioning: original size, crop top-left, target size (in pixels).
    time_ids = np.array([[h * 8, w * 8, 0, 0, h * 8, w * 8]], dtype=np.float32)
    added = {n for n in ("text_embeds", "time_ids") if n in ins} if xl else set()
    extra = {n: v for n, v in rt.seeded_inputs(unet, seed).items() if n not in (sample, tname, ehs, *added)}
    if extra:
        log.warning("calibration: inputs %s get seeded values", sorted(extra))
    records, x0s = [], []
    rng = np.random.default_rng(seed)
    alphas = getattr(sched, "alphas_cumprod", None)
    for k in track(range(n_traj), f"calibration trajectories ({role})"):
        cond, pool = te.encode(prompts[k % len(prompts)])
        sched.set_timesteps(steps)
        latents = torch.from_numpy(rng.standard_normal((1, c, h, w)).astype(np.float32)) * float(sched.init_noise_sigma)
        for t in sched.timesteps:
            x = sched.scale_model_input(torch.cat([latents] * 2), t).numpy().astype(np.float32)
            tval = np.full(specs[tname][0], float(t), dtype=specs[tname][1])
            halves = {ehs: np.concatenate([uncond, cond]).astype(np.float32)}
            if "text_embeds" in added:
                halves["text_embeds"] = np.concatenate([upool, pool]).astype(specs["text_embeds"][1])
            if "time_ids" in added:
                halves["time_ids"] = np.repeat(time_ids, 2, axis=0).astype(specs["time_ids"][1])
            if batch == 2:
                feeds = [{sample: x, tname: tval, **halves}]
            else:
                feeds = [{sample: x[i:i + 1], tname: tval, **{n: v[i:i + 1] for n, v in halves.items()}}
                         for i in range(2)]
            eps = []
            for f in feeds:
                f.update(extra)
                records.append(f)
                eps.append(unet_sess.run([out_name], f)[0])
            eps = np.concatenate(eps)
            guided = torch.from_numpy(eps[:1] + _GUIDANCE * (eps[1:2] - eps[:1]))
            out = sched.step(guided, t, latents)
            x0 = getattr(out, "pred_original_sample", None)
            if x0 is None and alphas is not None:  # PNDM: epsilon prediction in DDPM space
                a = float(alphas[int(t)])
                x0 = (latents - math.sqrt(1 - a) * guided) / math.sqrt(a)
            if x0 is not None:
                x0s.append(np.asarray(x0, dtype=np.float32))
            latents = out.prev_sample
    return records, x0s


def _spread(items: list, n: int) -> list:
    """``n`` items evenly spread over the list (over the schedule, for trajectories)."""
    if n >= len(items):
        return list(items)
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in idx]


def calibration_feeds(model, n: int, *, prompt_file: str | None = None, steps: int = 8, seed: int = 0,
                      holdout: bool = False, use_cache: bool = True) -> list[dict[str, np.ndarray]]:
    """``n`` feed dicts for ``model`` (a submodel of an exported pipeline), by role.

    UNet: latents, timesteps and text embeddings along guided denoising trajectories (both CFG
    halves, spread over ``steps`` scheduler steps), produced by the pipeline's own text encoder
    and scheduler with this UNet. Text encoder: tokenized prompts. VAE decoder: the trajectories'
    predicted clean latents divided by the VAE scaling factor. ``holdout`` draws from other
    prompts and noise, for checking the quantized graph on inputs it was not calibrated on.
    """
    from sdgraph.ir import runtime as rt

    if n < 1:
        raise UsageError("calibration needs at least 1 sample")
    role = model.role
    directory = model_dir(model)
    prompts = load_prompts(prompt_file)
    if holdout:
        prompts = prompts[::-1]
        seed = seed + 1000
    key_src = {"v": 1, "role": role, "dir": str(directory), "n": n, "steps": steps, "seed": seed,
               "prompts": prompts, "specs": {k: [list(s), str(d)] for k, (s, d) in rt.input_specs(model).items()}}
    if role == "text_encoder" or role == "text_encoder_2":
        key_src["files"] = _file_key(directory, ["tokenizer"])
    elif role in ("unet", "vae_decoder"):
        key_src["files"] = _file_key(directory, ["unet", "text_encoder", "tokenizer", "text_encoder_2",
                                                 "tokenizer_2", "scheduler"])
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:24]
    cache = cache_dir() / f"{role}-{key}.npz"
    if use_cache and cache.is_file():
        try:
            feeds = _load_cache(cache)
            log.info("calibration inputs from cache %s", cache)
            return feeds
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable calibration cache %s: %s", cache, exc)
    feeds = _make_feeds(model, role, directory, prompts, n, steps, seed)
    if use_cache:
        _save_cache(cache, feeds)
    return feeds


def _make_feeds(model, role, directory, prompts, n, steps, seed) -> list[dict[str, np.ndarray]]:
    from sdgraph.ir import runtime as rt
    from sdgraph.ir.model import Model

    if role in ("text_encoder", "text_encoder_2"):
        from transformers import CLIPTokenizer

        sub = "tokenizer_2" if role == "text_encoder_2" and (directory / "tokenizer_2").exists() else "tokenizer"
        tok = CLIPTokenizer.from_pretrained(str(need(directory, sub, role, "the tokenizer")))
        chosen = [prompts[i % len(prompts)] for i in range(n)]
        return tokenized_feeds(tok, rt.input_specs(model), chosen)
    if role == "unet":
        per_traj = max(1, steps) * (1 if (_fixed_batch(model.graph.inputs[0]) or 2) == 2 else 2)
        records, _ = _trajectories(model, directory, prompts, steps, math.ceil(n / per_traj), seed, role)
        return _spread(records, n)
    if role == "vae_decoder":
        unet = Model.load(need(directory, "unet/model.onnx", role, "the UNet (latents come from its trajectories)"))
        _, x0s = _trajectories(unet, directory, prompts, steps, math.ceil(n / max(1, steps)), seed, role)
        scale = _scaling_factor(directory)
        name = model.graph.inputs[0].name
        (b, c, h, w), dtype = rt.input_specs(model)[name]
        feeds = []
        for x0 in _spread(x0s, n):
            lat = (x0 / scale).astype(dtype)
            if lat.shape[-2:] != (h, w):
                raise InputError(f"UNet latents {lat.shape[-2:]} do not match the VAE decoder input {(h, w)}")
            feeds.append({name: np.repeat(lat[:1], b, axis=0)})
        return feeds
    if role == "vae_encoder":
        # Smooth images in [-1, 1]: low-frequency noise upsampled to the input size.
        rng = np.random.default_rng(seed)
        name = model.graph.inputs[0].name
        shape, dtype = rt.input_specs(model)[name]
        feeds = []
        for _ in range(n):
            small = rng.uniform(-1, 1, size=(shape[0], shape[1], max(1, shape[2] // 16), max(1, shape[3] // 16)))
            img = np.kron(small, np.ones((1, 1, 16, 16)))[:, :, : shape[2], : shape[3]]
            feeds.append({name: np.ascontiguousarray(img, dtype=dtype)})
        return feeds
    raise InputError(f"no calibration data for a model of role {role!r}")


def _save_cache(path: Path, feeds: list[dict[str, np.ndarray]]) -> None:
    from sdgraph.ir.io import atomic_file

    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"{i}::{k}": v for i, f in enumerate(feeds) for k, v in f.items()}
    try:
        with atomic_file(path, force=True) as tmp:  # the calibration cache's own file
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
    except (OSError, InputError) as exc:
        log.warning("cannot write calibration cache %s: %s", path, exc)


def _load_cache(path: Path) -> list[dict[str, np.ndarray]]:
    with np.load(path) as z:
        feeds: dict[int, dict[str, np.ndarray]] = {}
        for key in z.files:
            i, name = key.split("::", 1)
            feeds.setdefault(int(i), {})[name] = z[key]
    return [feeds[i] for i in sorted(feeds)]


class FeedReader:
    """An onnxruntime.quantization CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = list(feeds)
        self.start, self.end = 0, len(self.feeds)
        self._it: Iterator | None = None

    def get_next(self):
        if self._it is None:
            self._it = iter(self.feeds[self.start:self.end])
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end = start_index, end_index
        self._it = None

    def __len__(self) -> int:
        return len(self.feeds)

    def __iter__(self):
        return iter(self.feeds[self.start:self.end])
