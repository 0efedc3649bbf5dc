"""Image generation from an exported model dir (ONNX Runtime) or a lowered artifact dir, any target."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import inspect
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from sdgraph.errors import InputError, SdgraphError, TargetUnavailable, UsageError
from sdgraph.ir.modeldir import ModelDir
from sdgraph.ir.runtime import penultimate_hidden_state as _penultimate, pick_output as _pick
from sdgraph.manifest import read_json_object
from sdgraph.progress import track

__all__ = [
    "SCHEDULERS",
    "TIMESTEP_SPACINGS",
    "OrtRunner",
    "Pipeline",
    "Generation",
    "open_pipeline",
    "make_scheduler",
    "read_prompts",
    "load_image",
    "make_grid",
    "save_images",
    "readable",
]

log = logging.getLogger(__name__)

# --scheduler name -> diffusers class (all numpy/torch level: no weights).
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "lcm": "LCMScheduler",
}
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


# --------------------------------------------------------------------------- runners
class OrtRunner:
    """One ONNX submodel in an ONNX Runtime CPU session: ``runner(feeds) -> {name: array}``."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise InputError(f"ONNX Runtime cannot load {self.path}: {str(exc).splitlines()[0]}") from None
        ins = self.session.get_inputs()
        self.input_names = [i.name for i in ins]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_shapes = {i.name: list(i.shape) for i in ins}
        self.input_dtypes = {i.name: np.dtype(_ORT_TYPES.get(i.type, np.float32)) for i in ins}

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, dict(feeds))
        return dict(zip(self.output_names, outs))


class _Timed:
    """Wraps a runner; adds up wall time and calls per submodel (for bench)."""

    def __init__(self, runner, name: str, stats: dict):
        self.runner, self.name, self.stats = runner, name, stats
        self.input_names = list(runner.input_names)
        self.output_names = list(runner.output_names)
        self.input_shapes = dict(getattr(runner, "input_shapes", {}) or {})
        self.input_dtypes = dict(getattr(runner, "input_dtypes", {}) or {})

    def __call__(self, feeds):
        t0 = time.perf_counter()
        out = self.runner(feeds)
        dt = time.perf_counter() - t0
        s = self.stats.setdefault(self.name, {"calls": 0, "seconds": 0.0, "first": None})
        s["calls"] += 1
        s["seconds"] += dt
        if s["first"] is None:
            s["first"] = dt
        return {k: np.asarray(v) for k, v in out.items()}


# --------------------------------------------------------------------------- inputs
def read_prompts(prompt: str | None, prompt_file: str | os.PathLike | None) -> list[str]:
    """The prompts of ``--prompt`` or one per non-empty line of ``--prompt-file``."""
    if prompt is not None and prompt_file is not None:
        raise UsageError("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        p = Path(prompt_file)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{p}: prompt file is unreadable ({getattr(exc, 'strerror', None) or exc})") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise InputError(f"{p}: prompt file is empty (one prompt per line)")
        return prompts
    if prompt is None:
        raise UsageError("give a prompt: --prompt TEXT or --prompt-file FILE")
    return [check_text(prompt, "--prompt")]


def check_text(text: str, option: str) -> str:
    """Refuse text that is not valid Unicode (undecodable bytes on the command line)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{option}: not valid UTF-8 text") from None
    return text


def load_image(path: str | os.PathLike, width: int | None = None, height: int | None = None,
               notes: list[str] | None = None):
    """An RGB PIL image of exactly ``width`` x ``height`` (a different size is resized and noted);
    without a size, as it is."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    try:
        img = Image.open(p)
        img.load()
    except Image.DecompressionBombError as exc:
        raise InputError(f"{p}: image refused as a decompression bomb ({exc})".splitlines()[0]) from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise InputError(f"{p}: not a readable image ({exc})".splitlines()[0]) from None
    img = img.convert("RGB")
    if width is not None and height is not None and img.size != (width, height):
        msg = f"{p.name}: image is {img.size[0]}x{img.size[1]}, resized to {width}x{height}"
        log.warning(msg)
        if notes is not None:
            notes.append(msg)
        img = img.resize((width, height), Image.LANCZOS)
    return img


def make_grid(images: Sequence, cols: int | None = None):
    """Tile images (same size) into one grid image, row-major."""
    from PIL import Image

    if not images:
        raise UsageError("no images to put in a grid")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def save_images(images: Sequence, out: str | os.PathLike, grid: bool = False, force: bool = False) -> list[Path]:
    """Write images: one image and ``out`` ending in .png/.jpg -> that file; else a folder of PNGs.

    With ``grid`` a ``grid.png`` (or ``<out stem>_grid.png``) tiles them all. A folder is committed
    as a whole; existing files or a non-empty folder are replaced only with ``force``.
    """
    from sdgraph.ir.io import atomic_dir, atomic_file

    out = Path(out)
    is_file = out.suffix.lower() in (".png", ".jpg", ".jpeg")

    def save(img, path: Path, named: Path | None = None) -> None:
        img.save(path, format="JPEG" if (named or path).suffix.lower() in (".jpg", ".jpeg") else "PNG")

    if not is_file:
        with atomic_dir(out, force=force) as tmp:
            for i, img in enumerate(images):
                save(img, tmp / f"image_{i:03d}.png")
            if grid:
                save(make_grid(images), tmp / "grid.png")
        return [out / f"image_{i:03d}.png" for i in range(len(images))] + ([out / "grid.png"] if grid else [])
    targets = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i:03d}{out.suffix}") for i in range(len(images))]
    pairs = list(zip(images, targets))
    if grid:
        pairs.append((make_grid(images), out.with_name(f"{out.stem}_grid.png")))
    if not force:
        from sdgraph.ir.outputs import guard_output

        for _, path in pairs:
            guard_output(path, [], force=False)
    written: list[Path] = []
    for img, path in pairs:
        with atomic_file(path, force=force) as tmp:
            save(img, tmp, path)
        written.append(path)
    return written


def readable(path: Path) -> Path:
    """Give a file written through a temporary name (mode 0600) the usual mode under the umask."""
    mask = os.umask(0)
    os.umask(mask)
    path.chmod(0o666 & ~mask)
    return path


TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def make_scheduler(name: str | None, config: Mapping[str, Any] | None, timestep_spacing: str | None = None):
    """A diffusers scheduler by ``--scheduler`` name (or the model dir's own class when None).

    ``timestep_spacing`` overrides the config's (``trailing`` starts 1-step sampling at t=999, as
    SDXL-Turbo is run); None keeps the model dir's.
    """
    import diffusers

    if timestep_spacing is not None and timestep_spacing not in TIMESTEP_SPACINGS:
        raise UsageError(f"--timestep-spacing {timestep_spacing!r}: choose one of {', '.join(TIMESTEP_SPACINGS)}")
    cfg = dict(config or {})
    if name is None:
        cls_name = cfg.get("_class_name") or "DDIMScheduler"
    elif name in SCHEDULERS:
        cls_name = SCHEDULERS[name]
    else:
        raise UsageError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise UsageError(f"scheduler class {cls_name!r} from the model dir is not in diffusers {diffusers.__version__}")
    if not cfg:
        cfg = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   steps_offset=1)
    cfg.setdefault("clip_sample", False)  # what diffusers' SD pipelines force for latent diffusion
    if timestep_spacing is not None:
        cfg["timestep_spacing"] = timestep_spacing
    dlog = logging.getLogger("diffusers.configuration_utils")
    level = dlog.level
    dlog.setLevel(logging.ERROR)  # other classes' config keys are expected and ignored
    try:
        extra = {"algorithm_type": "dpmsolver++"} if name == "dpm++" else {}
        sched = cls.from_config(cfg, **extra)
        sched.set_timesteps(2)  # a config with nonsense values fails here, not in the denoising loop
        return sched
    except SdgraphError:
        raise
    except Exception as exc:  # diffusers raises anything on a corrupt config
        raise InputError(f"scheduler config ({cls_name}) is not usable: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    finally:
        dlog.setLevel(level)


# --------------------------------------------------------------------------- the pipeline
@dataclasses.dataclass
class Generation:
    """Images from one ``generate`` call, with what happened on the way."""

    images: list
    seconds: float
    notes: list[str]
    stats: dict[str, dict]  # per submodel: calls, seconds, first
    steps_run: int
    timesteps: list[float] = dataclasses.field(default_factory=list)  # the UNet's timesteps, in order
    unet_calls: list[str] = dataclasses.field(default_factory=list)  # the UNet variant called at each step


def _find_key(obj: Any, key: str):
    if isinstance(obj, dict):
        if key in obj and not isinstance(obj[key], (dict, list)):
            return obj[key]
        for v in obj.values():
            r = _find_key(v, key)
            if r is not None:
                return r
    elif isinstance(obj, list):
        for v in obj:
            r = _find_key(v, key)
            if r is not None:
                return r
    return None


# --------------------------------------------------------------------------- ControlNet
class _ControlMixin:
    """The ControlNet half of :class:`Pipeline`: control image, ControlNet call, UNet residual feeds."""

    def _init_control(self) -> None:
        from sdgraph.export import MID_RESIDUAL_INPUT, MID_RESIDUAL_OUTPUT, RESIDUAL_INPUT, RESIDUAL_OUTPUT

        names = self.unet.input_names
        n = sum(1 for x in names if x.startswith(RESIDUAL_INPUT.format("")))
        self.residual_inputs = [RESIDUAL_INPUT.format(i) for i in range(n)] + \
            ([MID_RESIDUAL_INPUT] if MID_RESIDUAL_INPUT in names else [])
        self.residual_outputs = [RESIDUAL_OUTPUT.format(i) for i in range(n)] + [MID_RESIDUAL_OUTPUT]
        self.controlnet = self.instances["controlnet"][0] if "controlnet" in self.instances else None
        self._control: tuple[np.ndarray, float] | None = None
        if self.controlnet is not None and not self.residual_inputs:
            raise InputError(f"{self.path}: has a controlnet but its unet takes no ControlNet residuals "
                             "(export both together: sdgraph export ... --controlnet DIR)")

    def _prepare_control(self, image, scale: float, width: int, height: int, notes: list[str]):
        """The control image as diffusers prepares it: RGB, resized to the output size (noted), in [0, 1]."""
        if image is None:
            return None
        if self.controlnet is None:
            raise InputError(f"{self.path}: no controlnet submodel (export a ControlNet pipeline, or with "
                             "--controlnet DIR)")
        if self.is_pix2pix:
            raise UsageError("a ControlNet does not go with an InstructPix2Pix model")
        if not hasattr(image, "size"):
            image = load_image(image, width, height, notes)
        elif image.size != (width, height):
            from PIL import Image

            notes.append(f"control image is {image.size[0]}x{image.size[1]}, resized to {width}x{height}")
            image = image.convert("RGB").resize((width, height), Image.LANCZOS)
        arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        return np.ascontiguousarray(arr.transpose(2, 0, 1)[None]), float(scale)

    def _control_feeds(self, feeds: dict[str, np.ndarray], cond: np.ndarray, scale: float) -> dict[str, np.ndarray]:
        cn = self.controlnet
        batch = feeds[self._unet_name("sample")].shape[0]
        out = {}
        for n in cn.input_names:
            dtype = cn.input_dtypes.get(n, np.dtype(np.float32))
            shape = cn.input_shapes.get(n)
            if n == "controlnet_cond":
                v = np.repeat(cond, batch, axis=0)
            elif n == "conditioning_scale":
                v = np.full([1] * (len(shape) if shape is not None else 1), scale)
            else:
                v = feeds[self._unet_name(n) if n in ("sample", "timestep", "encoder_hidden_states") else n]
                if shape is not None and len(shape) == 0:
                    v = v.reshape(-1)[0]
            out[n] = np.asarray(v).astype(dtype)
        return out

    def _with_residuals(self, chunks: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Each UNet chunk plus the residuals: one batched ControlNet call over all chunks (zeros
        where no control image was given and the residual shapes are static)."""
        sample = self._unet_name("sample")
        sizes = [c[sample].shape[0] for c in chunks]
        merged = {k: np.concatenate([c[k] for c in chunks], axis=0) if chunks[0][k].ndim and len(chunks) > 1
                  else chunks[0][k] for k in chunks[0]}
        control = self._control
        if control is None:
            shapes = [self.unet.input_shapes.get(n) or [] for n in self.residual_inputs]
            if all(len(s) == 4 and all(isinstance(d, (int, np.integer)) and d > 0 for d in s[1:]) for s in shapes):
                return [dict(c, **{n: np.zeros([c[sample].shape[0], *s[1:]], self.unet.input_dtypes.get(n, np.float32))
                                   for n, s in zip(self.residual_inputs, shapes)}) for c in chunks]
            if self.controlnet is None:
                raise InputError(f"{self.path}: the unet takes ControlNet residuals of open shapes and there is "
                                 "no controlnet submodel to make them")
            h, w = merged[sample].shape[2] * self.vae_scale, merged[sample].shape[3] * self.vae_scale
            control = (np.zeros((1, 3, h, w), np.float32), 0.0)  # scale 0: exact zeros of the right shapes
        cn = self.controlnet
        outs = self._batched(cn, self._control_feeds(merged, *control), "sample")
        if all(o in outs for o in self.residual_outputs):
            res = [outs[o] for o in self.residual_outputs]
        else:  # a runtime renamed the outputs: they keep their order
            res = [outs[o] for o in cn.output_names]
        bounds = np.cumsum(sizes)[:-1]
        split = [np.split(np.asarray(r), bounds, axis=0) for r in res]
        return [dict(c, **{n: split[j][i].astype(self.unet.input_dtypes.get(n, np.float32), copy=False)
                           for j, n in enumerate(self.residual_inputs)}) for i, c in enumerate(chunks)]


class Pipeline(_ControlMixin):
    """Stable Diffusion sampling over loaded submodels (runners); numpy/torch glue, no weights here.

    Handles: 1. txt2img with classifier-free guidance; 2. img2img with ``strength``;
    3. InstructPix2Pix (8-channel UNet: image latents concatenated, three-way guidance);
    4. SDXL / Turbo (two text encoders, ``text_embeds`` and ``time_ids``, guidance 0 = one batch);
    5. ``devices`` > 1: the guidance batch is split over that many runner instances, run in threads;
    6. ControlNet: a ``controlnet`` submodel run before the UNet each step on the same inputs plus
       the control image; its residuals feed the UNet's residual inputs (zeros without a control image).
    """

    def __init__(self, path: Path, runners: dict[str, list], manifest: dict, kind: str, target: str,
                 load_seconds: dict[str, float]):
        self.path = path
        self.manifest = manifest
        self.kind = kind  # "model" or "artifact"
        self.target = target
        self.load_seconds = load_seconds
        self.stats: dict[str, dict] = {}
        self.instances = {name: [_Timed(r, name, self.stats) for r in rs] for name, rs in runners.items()}
        if "unet" not in self.instances:
            raise InputError(f"{path}: no unet submodel (need at least unet/ and vae_decoder/)")
        if "vae_decoder" not in self.instances:
            raise InputError(f"{path}: no vae_decoder submodel")
        if "text_encoder" not in self.instances:
            raise InputError(f"{path}: no text_encoder submodel")
        self.unet = self.instances["unet"][0]
        self.is_xl = "text_embeds" in self.unet.input_names or "text_encoder_2" in self.instances
        self.in_channels = self._static_dim(self.unet, self._unet_name("sample"), 1) or 4
        self.is_pix2pix = self.in_channels == 8
        self.tokenizer = self._tokenizer("tokenizer")
        self.tokenizer_2 = self._tokenizer("tokenizer_2") if self.is_xl else None
        sf = _find_key(manifest, "scaling_factor") or _find_key(manifest, "vae_scaling_factor")
        self.scaling_factor = float(sf) if sf else (0.13025 if self.is_xl else 0.18215)
        self.shift_factor = float(_find_key(manifest, "shift_factor") or 0.0)
        sched_cfg = path / "scheduler" / "scheduler_config.json"
        self.scheduler_config = read_json_object(sched_cfg, "scheduler config") if sched_cfg.is_file() else {}
        self.vae_scale = _vae_scale_factor(path, manifest)
        self._init_control()
        self.variant_entries, self.schedule = _unet_schedule(path, manifest, self.instances)
        self.feature_outputs = {str(f.get("from", "unet")): str(f.get("output", f["input"]))
                                for e in self.variant_entries.values() if isinstance(f := e.get("feature"), Mapping)}
        self._plan: list[str] = []
        self._cached: list[np.ndarray] | None = None
        self._calls: list[str] = []

    # -- helpers ---------------------------------------------------------------------------
    def _tokenizer(self, sub: str):
        from transformers import CLIPTokenizer

        d = self.path / sub
        if not d.is_dir():
            if sub == "tokenizer_2":
                return self.tokenizer
            raise InputError(f"{self.path}: no {sub}/ folder (the tokenizer is read from the model dir)")
        try:
            return CLIPTokenizer.from_pretrained(str(d), local_files_only=True)
        except Exception as exc:
            raise InputError(f"{d}: cannot load the CLIP tokenizer ({str(exc).splitlines()[0]})") from None

    @staticmethod
    def _static_dim(runner, name: str | None, axis: int) -> int | None:
        shape = runner.input_shapes.get(name) if name else None
        if shape and len(shape) > axis and isinstance(shape[axis], (int, np.integer)) and shape[axis] > 0:
            return int(shape[axis])
        return None

    def _unet_name(self, want: str) -> str:
        names = self.unet.input_names
        if want in names:
            return want
        aliases = {"sample": ("latent", "x"), "timestep": ("t", "timesteps"),
                   "encoder_hidden_states": ("hidden_states", "context")}
        for a in aliases.get(want, ()):
            if a in names:
                return a
        order = {"sample": 0, "timestep": 1, "encoder_hidden_states": 2}
        if want in order and len(names) > order[want]:
            return names[order[want]]
        raise InputError(f"{self.path}: unet has no input {want!r} (inputs: {', '.join(names)})")

    def buckets(self) -> list[tuple[int, int]]:
        """Declared (height, width) buckets in pixels; empty when any size (multiple of 8) is fine."""
        out: list[tuple[int, int]] = []
        h = self._static_dim(self.unet, self._unet_name("sample"), 2)
        w = self._static_dim(self.unet, self._unet_name("sample"), 3)
        if h and w:
            out.append((h * self.vae_scale, w * self.vae_scale))
        unet_entry = (self.manifest.get("submodels") or {}).get("unet") if isinstance(self.manifest.get("submodels"), dict) else None
        for b in (unet_entry or {}).get("shapes", []) or []:
            s = b.get(self._unet_name("sample")) if isinstance(b, dict) else None
            if s and len(s) == 4 and all(isinstance(x, int) for x in s[2:]):
                out.append((s[2] * self.vae_scale, s[3] * self.vae_scale))
        return sorted(set(out))

    def default_size(self) -> tuple[int, int]:
        b = self.buckets()
        if b:
            return b[0]
        src = self.manifest.get("source_manifest") or {}
        h = self.manifest.get("height") or src.get("height")
        w = self.manifest.get("width") or src.get("width")
        if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
            return h, w
        return 512, 512

    def check_size(self, height: int, width: int) -> None:
        f = self.vae_scale
        if height <= 0 or width <= 0 or height % f or width % f:
            raise UsageError(f"height/width {height}x{width}: both must be positive multiples of {f} "
                             f"(the VAE's scale factor)")
        b = self.buckets()
        if b and (height, width) not in b:
            raise UsageError(f"height/width {height}x{width} is outside the declared shape buckets "
                             f"({', '.join(f'{h}x{w}' for h, w in b)}) of {self.path}")

    def _batched(self, runner, feeds: dict[str, np.ndarray], batch_input: str) -> dict[str, np.ndarray]:
        """Run ``runner`` on feeds of batch N when its graph has a static batch B != N.

        The rows go through in pieces of B (the last one padded by repeating its last row, the
        padding dropped from the outputs); inputs without that batch axis are passed whole.
        """
        n = feeds[batch_input].shape[0]
        b = self._static_dim(runner, batch_input, 0)
        if b is None or b == n:
            return runner(feeds)
        pieces = []
        for start in range(0, n, b):
            keep = min(b, n - start)
            piece = {}
            for k, v in feeds.items():
                if v.ndim and v.shape[0] == n:
                    v = v[start:start + b]
                    if keep < b:
                        v = np.concatenate([v, np.repeat(v[-1:], b - keep, axis=0)], axis=0)
                piece[k] = v
            pieces.append({k: np.asarray(o)[:keep] for k, o in runner(piece).items()})
        return {k: np.concatenate([p[k] for p in pieces], axis=0) for k in pieces[0]}

    def _encode_text(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """Prompt embeddings (and SDXL's pooled embeddings) for a batch of prompts, in one call per
        encoder when its batch allows (a batch-2 export encodes [uncond, cond] together)."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="np").input_ids
        te = self.instances["text_encoder"][0]
        name = te.input_names[0]
        out1 = self._batched(te, {name: ids.astype(te.input_dtypes.get(name, np.int64))}, name)
        if not self.is_xl:
            return _pick(out1, ("last_hidden_state",), 0), None
        h1 = _penultimate(out1)
        te2 = self.instances.get("text_encoder_2", [te])[0]
        name2 = te2.input_names[0]
        ids2 = self.tokenizer_2(prompts, padding="max_length", max_length=self.tokenizer_2.model_max_length,
                                truncation=True, return_tensors="np").input_ids
        out2 = self._batched(te2, {name2: ids2.astype(te2.input_dtypes.get(name2, np.int64))}, name2)
        h2 = _penultimate(out2)
        pooled = _pick(out2, ("text_embeds", "pooler_output"), 0)
        return np.concatenate([h1, h2], axis=-1), pooled

    def _unet(self, chunks: list[dict[str, np.ndarray]], variant: str = "unet",
              keep: str | None = None) -> list[np.ndarray]:
        """Run the UNet (or one of its variants) on guidance chunks: one batched call, or split across
        device instances. ``keep``: an extra output to keep per chunk (``self._kept``)."""
        insts = self.instances[variant]
        kept: dict[int, np.ndarray] = {}

        def call(runner, feeds):
            outs = runner(feeds)
            if keep is not None:
                kept[id(feeds)] = np.asarray(outs[keep])
            return _pick(outs, ("out_sample", "noise_pred", "sample"), 0)

        sample = self._unet_name("sample")
        if self.residual_inputs:
            chunks = self._with_residuals(chunks)
        if len(insts) > 1 and len(chunks) > 1:
            with concurrent.futures.ThreadPoolExecutor(len(insts)) as ex:
                futs = [ex.submit(lambda r, c: call(_BatchedRunner(self, r, sample), c), insts[i % len(insts)], c)
                        for i, c in enumerate(chunks)]
                res = [f.result() for f in futs]
            self._kept = [kept[id(c)] for c in chunks] if keep is not None else None
            return res
        merged = {k: np.concatenate([c[k] for c in chunks], axis=0) if chunks[0][k].ndim else chunks[0][k]
                  for k in chunks[0]}
        res = call(_BatchedRunner(self, insts[0], sample), merged)
        sizes = np.cumsum([c[sample].shape[0] for c in chunks])[:-1]
        self._kept = np.split(kept[id(merged)], sizes, axis=0) if keep is not None else None
        return np.split(res, sizes, axis=0)

    # -- per-step UNet schedules (sdgraph.schedule): which variant runs at which step --------
    def _start_schedule(self, total: int) -> None:
        """Plan the UNet variant of every step (the manifest's schedule; plain ``unet`` without one)."""
        self._plan = self.schedule.plan(total) if self.schedule is not None else ["unet"] * total
        self._cached, self._calls = None, []

    def _unet_step(self, step: int, chunks: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
        """The UNet call of denoising step ``step``: the planned variant; a variant that produces a
        cached feature (DeepCache's full graph) keeps it, one that reads it gets it as an input."""
        variant = self._plan[step] if step < len(self._plan) else "unet"
        self._calls.append(variant)
        entry = self.variant_entries.get(variant) or {}
        feature = entry.get("feature") if isinstance(entry.get("feature"), Mapping) else None
        if feature is not None:
            if self._cached is None:
                raise InputError(f"{self.path}: step {step} calls {variant!r} before its cached feature exists")
            chunks = [dict(c, **{feature["input"]: f}) for c, f in zip(chunks, self._cached)]
            return self._unet(chunks, variant)
        produces = self.feature_outputs.get(variant)
        if produces is None:
            return self._unet(chunks, variant)
        out = self._unet(chunks, variant, keep=produces)
        self._cached = self._kept
        return out

    def _timestep(self, t, batch: int) -> np.ndarray:
        name = self._unet_name("timestep")
        dtype = self.unet.input_dtypes.get(name, np.dtype(np.float32))
        shape = self.unet.input_shapes.get(name)
        val = np.asarray(float(t)).astype(dtype)
        if shape is not None and len(shape) == 0:
            return val
        if shape is not None and len(shape) == 1 and self._static_dim(self.unet, name, 0) == 1:
            return val.reshape(1)
        return np.full((batch,), val, dtype=dtype)

    def _vae_encode(self, img, sample: bool, generator) -> np.ndarray:
        import torch

        enc = self.instances.get("vae_encoder")
        if not enc:
            raise InputError(f"{self.path}: img2img and pix2pix need a vae_encoder/ submodel")
        x = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        x = x.transpose(2, 0, 1)[None]
        name = enc[0].input_names[0]
        out = _pick(self._batched(enc[0], {name: x}, name), ("latent_parameters", "latent_sample", "latent_dist"), 0)
        if out.shape[1] == 8:  # mean and log-variance of the latent distribution
            mean, logvar = out[:, :4], np.clip(out[:, 4:], -30.0, 20.0)
            if sample:
                noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32).numpy()
                return mean + np.exp(0.5 * logvar) * noise
            return mean
        return out

    # -- generation ------------------------------------------------------------------------
    def generate(self, prompt: str, *, negative_prompt: str = "", steps: int = 20, guidance: float = 7.5,
                 seed: int = 0, height: int | None = None, width: int | None = None,
                 scheduler: str | None = None, eta: float = 0.0, image=None, strength: float = 0.8,
                 image_guidance: float = 1.5, timestep_spacing: str | None = None,
                 callback: Callable[[int], None] | None = None, control_image=None,
                 control_scale: float = 1.0) -> Generation:
        """One image for ``prompt``; ``image`` (PIL or path) selects img2img or, on an 8-channel UNet, pix2pix;
        ``control_image`` (PIL or path) conditions a ControlNet model dir at ``control_scale``."""
        import torch

        from sdgraph.limits import check_all

        check_all(steps=steps, seed=seed, guidance=guidance, eta=eta, strength=strength, image_guidance=image_guidance,
                  control_scale=control_scale)
        check_text(prompt, "--prompt")
        check_text(negative_prompt, "--negative-prompt")
        notes: list[str] = []
        dh, dw = self.default_size()
        height, width = height or dh, width or dw
        self.check_size(height, width)
        if steps < 1:
            raise UsageError(f"--steps {steps}: need at least 1 step")
        if self.is_pix2pix and image is None:
            raise UsageError(f"{self.path} is an InstructPix2Pix model (8-channel UNet): give --image")
        img2img = image is not None and not self.is_pix2pix
        if img2img:
            if not 0.0 < strength <= 1.0:
                raise UsageError(f"--strength {strength}: must be in (0, 1]")
            if int(steps * strength) < 1:
                raise UsageError(f"--steps {steps} x --strength {strength} = {steps * strength:g} gives no denoising "
                                 "step; steps x strength must be >= 1")
        if image is not None and not hasattr(image, "size"):
            image = load_image(image, width, height, notes)
        elif image is not None and image.size != (width, height):
            notes.append(f"image is {image.size[0]}x{image.size[1]}, resized to {width}x{height}")
            from PIL import Image

            image = image.convert("RGB").resize((width, height), Image.LANCZOS)

        self._control = self._prepare_control(control_image, control_scale, width, height, notes)

        self.stats.clear()
        t_start = time.perf_counter()
        sched = make_scheduler(scheduler, self.scheduler_config, timestep_spacing)
        gen = torch.Generator().manual_seed(int(seed))
        cfg = guidance > 1.0
        need_uncond = cfg or self.is_pix2pix
        if need_uncond and not (self.is_xl and not negative_prompt):
            # one text-encoder call for [uncond, cond] (what a batch-2 export takes)
            emb, pool = self._encode_text([negative_prompt, prompt])
            uncond, cond = emb[:1], emb[1:]
            upooled, pooled = (pool[:1], pool[1:]) if pool is not None else (None, None)
        else:
            cond, pooled = self._encode_text([prompt])
            if need_uncond:  # SDXL without a negative prompt: zeros, as diffusers does
                uncond, upooled = np.zeros_like(cond), (np.zeros_like(pooled) if pooled is not None else None)
        # Latents.
        lh, lw = height // self.vae_scale, width // self.vae_scale
        sched.set_timesteps(steps)
        timesteps = sched.timesteps
        image_latents = None
        if img2img:  # same order of random draws as diffusers: latent sample first, then noise
            init = torch.from_numpy((self._vae_encode(image, True, gen) - self.shift_factor) * self.scaling_factor)
            noise = torch.randn((1, 4, lh, lw), generator=gen, dtype=torch.float32)
            init_steps = min(int(steps * strength), steps)
            begin = max(steps - init_steps, 0)
            timesteps = timesteps[begin * sched.order:]
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(begin * sched.order)
            latents = sched.add_noise(init, noise, timesteps[:1])
        else:
            noise = torch.randn((1, 4, lh, lw), generator=gen, dtype=torch.float32)
            latents = noise * sched.init_noise_sigma
            if self.is_pix2pix:
                image_latents = self._vae_encode(image, False, gen)
        extra = {}
        if "eta" in inspect.signature(sched.step).parameters:
            extra["eta"] = eta
        if "generator" in inspect.signature(sched.step).parameters:
            extra["generator"] = gen
        time_ids = np.array([[height, width, 0, 0, height, width]], dtype=np.float32)
        names = {k: self._unet_name(k) for k in ("sample", "timestep", "encoder_hidden_states")}

        def chunk(x: np.ndarray, ctx: np.ndarray, pool, t) -> dict[str, np.ndarray]:
            d = {names["sample"]: x.astype(np.float32), names["timestep"]: self._timestep(t, x.shape[0]),
                 names["encoder_hidden_states"]: ctx.astype(np.float32)}
            if self.is_xl:
                d["text_embeds"] = pool.astype(np.float32)
                d["time_ids"] = np.repeat(time_ids, x.shape[0], axis=0)
            return d

        self._start_schedule(len(timesteps))
        for i, t in enumerate(track(timesteps, "denoising")):
            x = sched.scale_model_input(latents, t).numpy()
            if self.is_pix2pix:
                zeros = np.zeros_like(image_latents)
                parts = [(np.concatenate([x, image_latents], 1), cond), (np.concatenate([x, image_latents], 1), uncond),
                         (np.concatenate([x, zeros], 1), uncond)]
                if cfg:
                    preds = self._unet_step(i, [chunk(a, c, None, t) for a, c in parts])
                    p_text, p_img, p_unc = preds
                    eps = p_unc + guidance * (p_text - p_img) + image_guidance * (p_img - p_unc)
                else:
                    eps = self._unet_step(i, [chunk(*parts[0], None, t)])[0]
            elif cfg:
                p_unc, p_text = self._unet_step(i, [chunk(x, uncond, upooled, t), chunk(x, cond, pooled, t)])
                eps = p_unc + guidance * (p_text - p_unc)
            else:
                eps = self._unet_step(i, [chunk(x, cond, pooled, t)])[0]
            latents = sched.step(torch.from_numpy(np.ascontiguousarray(eps)), t, latents, **extra).prev_sample
            if callback:
                callback(i)
        dec = self.instances["vae_decoder"][0]
        z = (latents.numpy() / self.scaling_factor + self.shift_factor).astype(np.float32)
        pix = _pick(self._batched(dec, {dec.input_names[0]: z}, dec.input_names[0]), ("sample",), 0)
        images = _to_pil(pix)
        if not np.isfinite(pix).all():
            notes.append("the decoded image has NaN/Inf values")
        return Generation(images=images, seconds=time.perf_counter() - t_start, notes=notes,
                          stats={k: dict(v) for k, v in self.stats.items()}, steps_run=len(timesteps),
                          timesteps=[float(t) for t in timesteps], unet_calls=list(self._calls))


def schedule_manifest(manifest: Mapping[str, Any]) -> Mapping[str, Any]:
    """Where a dir's UNet variants and schedule are recorded: its own manifest, or (an artifact
    lowered before they were copied up) the source manifest it keeps."""
    if "variants" in manifest or "schedule" in manifest:
        return manifest
    src = manifest.get("source_manifest")
    return src if isinstance(src, Mapping) else {}


def _unet_schedule(path: Path, manifest: Mapping[str, Any], instances: Mapping[str, list]):
    """(variant entries, Schedule or None) of the UNet; a schedule naming a variant that is not here is refused."""
    from sdgraph.schedule import read_schedule, variants_of

    m = schedule_manifest(manifest)
    entries = variants_of(m, "unet")
    schedule = read_schedule(m, "unet")
    if schedule is not None:
        missing = sorted({r.variant for r in schedule.rules} - set(instances))
        if missing:
            raise InputError(f"{path}: the UNet schedule calls {', '.join(missing)}, which is not in this dir")
    return entries, schedule


class _BatchedRunner:
    """A runner called through :meth:`Pipeline._batched` (any batch on a static-batch graph)."""

    def __init__(self, pipe: Pipeline, runner, batch_input: str):
        self.pipe, self.runner, self.batch_input = pipe, runner, batch_input

    def __call__(self, feeds):
        return self.pipe._batched(self.runner, feeds, self.batch_input)


def _vae_scale_factor(path: Path, manifest: Mapping[str, Any]) -> int:
    """Pixels per latent pixel: the manifest's ``vae_scale_factor`` (export records it), else the VAE
    config's ``2 ** (len(block_out_channels) - 1)`` as diffusers computes it, else the decoder graph's
    output/input size ratio, else 8."""
    for m in (manifest, manifest.get("source_manifest") or {}):
        v = m.get("vae_scale_factor") if isinstance(m, Mapping) else None
        if isinstance(v, int) and v > 0:
            return v
    src = Path(str((manifest.get("source") or {}).get("path", ""))) if isinstance(manifest.get("source"), Mapping) else None
    roots = [path] + ([src] if src else [])
    for root in roots:
        for sub in ("vae_decoder", "vae_encoder", "vae"):
            cfg = root / sub / "config.json"
            if cfg.is_file():
                try:
                    blocks = read_json_object(cfg, "VAE config").get("block_out_channels")
                except InputError:  # unreadable, or not a JSON object: the graph's shapes decide below
                    continue
                if blocks:
                    return 2 ** (len(blocks) - 1)
    import onnx

    for root in roots:
        f = root / "vae_decoder" / "model.onnx"
        if not f.is_file():
            continue
        try:
            g = onnx.load(str(f), load_external_data=False).graph
        except Exception:  # noqa: BLE001 - unreadable: fall through to the default
            continue
        dims = [[d.dim_value for d in t.type.tensor_type.shape.dim] for t in (g.input[0], g.output[0])]
        if len(dims[0]) == 4 and len(dims[1]) == 4 and dims[0][2] and dims[1][2]:
            return max(1, dims[1][2] // dims[0][2])
    return 8


def _to_pil(pix: np.ndarray) -> list:
    from PIL import Image

    arr = np.nan_to_num(pix.astype(np.float32))
    arr = np.clip((arr / 2.0 + 0.5) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return [Image.fromarray(a.transpose(1, 2, 0)) for a in arr]


# --------------------------------------------------------------------------- loading
def open_pipeline(path: str | os.PathLike, devices: int = 1, threads: int | None = None,
                  target: str | None = None) -> Pipeline:
    """Load a model dir (ONNX Runtime) or a lowered artifact dir (its target's runtime)."""
    from sdgraph.targets.base import ARTIFACT_KIND

    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: not a directory (need an exported model dir or a lowered artifact dir)")
    if devices < 1:
        raise UsageError(f"--devices {devices}: must be >= 1")
    mdir = ModelDir(path)
    manifest = mdir.manifest
    is_artifact = manifest.get("kind") == ARTIFACT_KIND
    if devices > 1 and threads is None:
        threads = max(1, (os.cpu_count() or 2) // devices)
    runners: dict[str, list] = {}
    load_seconds: dict[str, float] = {}
    if is_artifact:
        try:
            from sdgraph.targets import load_artifact
        except ImportError as exc:  # pragma: no cover
            raise TargetUnavailable(f"cannot load artifacts: {exc}") from None
        artifact = load_artifact(path, target=target)
        for name in ModelDir(path, dict(schedule_manifest(manifest))).names:  # the variants of older artifacts too
            for _ in range(devices if name.startswith("unet") else 1):
                t0 = time.perf_counter()
                r = _load_artifact_submodel(artifact, path, name)
                if r is None:
                    break
                load_seconds[name] = load_seconds.get(name, 0.0) + time.perf_counter() - t0
                runners.setdefault(name, []).append(r)
        tgt = str(manifest.get("target", "artifact"))
    else:
        if target not in (None, "onnxruntime", "ort"):
            raise InputError(f"{path}: a plain model dir runs on ONNX Runtime only; lower it with "
                             f"`sdgraph lower {path} --target {target}` first")
        for name in mdir.submodels:
            f = mdir.model_path(name)
            n = devices if name.startswith("unet") else 1
            for _ in range(n):
                t0 = time.perf_counter()
                runners.setdefault(name, []).append(OrtRunner(f, threads=threads))
                load_seconds[name] = load_seconds.get(name, 0.0) + time.perf_counter() - t0
        if not runners:
            raise InputError(f"{path}: no <submodel>/model.onnx here (not an exported model dir or artifact dir)")
        tgt = "onnxruntime"
    return Pipeline(path, runners, manifest, "artifact" if is_artifact else "model", tgt, load_seconds)


def _io_info(path: Path, manifest: dict, name: str) -> tuple[dict, dict]:
    """Input shapes and dtypes of a submodel, from its ONNX file in the artifact or in the source dir."""
    import onnx

    src = Path(str((manifest.get("source") or {}).get("path", "")))
    for f in (path / name / "model.onnx", src / name / "model.onnx", *sorted((path / name).glob("*.onnx"))):
        if f.is_file():
            try:
                g = onnx.load(str(f), load_external_data=False).graph
            except Exception:  # noqa: BLE001 - an unreadable candidate: try the next one
                log.debug("cannot read %s for input info", f, exc_info=True)
                continue
            shapes, dtypes = {}, {}
            for i in g.input:
                tt = i.type.tensor_type
                shapes[i.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim]
                dtypes[i.name] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
            return shapes, dtypes
    return {}, {}


def _load_artifact_submodel(artifact, path: Path, name: str):
    """One fresh runner of submodel ``name`` from an opened artifact (``sdgraph.targets.load_artifact``)."""
    if name not in artifact.submodels:
        return None
    runner = artifact.runner(name)
    artifact._runners.pop(name, None)  # the next call loads another instance (--devices)
    if not getattr(runner, "input_shapes", None) or not getattr(runner, "input_dtypes", None):
        shapes, dtypes = _io_info(path, artifact.manifest, name)
        runner = _WithInfo(runner, shapes, dtypes)
    return runner


class _WithInfo:
    """A runner plus the input shapes/dtypes the pipeline needs (timestep dtype, static dims)."""

    def __init__(self, runner, shapes: dict, dtypes: dict):
        self.runner = runner
        self.input_names = list(runner.input_names)
        self.output_names = list(runner.output_names)
        self.input_shapes = shapes
        self.input_dtypes = dtypes

    def __call__(self, feeds):
        return self.runner(feeds)
