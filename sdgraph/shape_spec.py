"""``--shape`` text per submodel, and the shapes one ``--height/--width/--batch`` derives for a model dir.

One parser for every command that takes shapes (``optimize --verify``, ``lower``):

``[SUBMODEL:]INPUT=DIMS`` with DIMS joined by ``x`` or ``,`` (``unet:sample=2x4x64x64``,
``input_ids=1,77``), several per argument separated by ``;``. A qualified name applies to that
submodel only; a bare name applies to every submodel whose input of that name can take it (same
rank, every fixed dimension equal), so ``sample=2x4x64x64`` reaches the UNet and not the VAE
encoder's 3-channel ``sample``. Unknown submodels or inputs, and a bare name that fits no submodel,
are refused with one line.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

import numpy as np

from sdgraph.errors import UsageError
from sdgraph.ir.modeldir import SUBMODELS

__all__ = [
    "parse_shape_spec",
    "parse_shape_args",
    "normalize_shapes",
    "split_key",
    "shapes_for",
    "check_shape_names",
    "derive_shapes",
    "input_dims",
    "with_defaults",
    "size_hint",
]

Bucket = dict  # "input" or "submodel:input" -> dims
_QUALIFIERS = SUBMODELS + ("model",)
_TEXT_SEQ = 77  # CLIP's context length: the tokenizers pad to it


def split_key(key: str) -> tuple[str | None, str]:
    """``"unet:sample"`` -> ("unet", "sample"); ``"sample"`` or ``"onnx::Reshape_0"`` -> (None, key)."""
    head, sep, tail = key.partition(":")
    if sep and head in _QUALIFIERS and tail and not tail.startswith(":"):
        return head, tail
    return None, key


def _fmt(dims: Iterable[int]) -> str:
    return "x".join(str(d) for d in dims)


def parse_shape_spec(text: str) -> Bucket:
    """``unet:sample=2x4x64x64;input_ids=1x77`` -> one bucket (keys as written, dims by x or comma)."""
    bucket: Bucket = {}
    for part in [p for p in re.split(r"[;\s]+", text) if p.strip()]:
        if "=" not in part:
            raise UsageError(f"bad --shape {text!r}: expected [submodel:]name=dims like unet:sample=2x4x64x64")
        name, dims = part.rsplit("=", 1)
        name = name.strip()
        try:
            bucket[name] = tuple(int(d) for d in re.split(r"[x,*]", dims.lower()) if d.strip() != "")
        except ValueError:
            raise UsageError(f"bad --shape {part!r}: dims must be integers joined by x (2x4x64x64)") from None
        if not name or not bucket[name] or any(d <= 0 for d in bucket[name]):
            raise UsageError(f"bad --shape {part!r}: expected a name and positive integer dims")
    if not bucket:
        raise UsageError(f"bad --shape {text!r}: empty")
    return bucket


def parse_shape_args(items: Iterable[str]) -> list[Bucket]:
    """Repeated ``--shape``: a repeated name starts a new bucket; names not repeated carry over.

    ``--shape sample=2x4x64x64 --shape encoder_hidden_states=2x77x768 --shape sample=2x4x96x96``
    declares two buckets (64 and 96 latents) sharing the text shape.
    """
    buckets: list[Bucket] = []
    cur: Bucket = {}
    for item in items:
        for k, v in parse_shape_spec(item).items():
            if k in cur:
                buckets.append(cur)
                cur = dict(cur)
            cur[k] = v
    if cur:
        buckets.append(cur)
    return buckets


def normalize_shapes(shapes) -> list[Bucket]:
    """None | text | mapping | list of those -> a list of buckets."""
    if shapes is None:
        return []
    if isinstance(shapes, str):
        return [parse_shape_spec(shapes)]
    if isinstance(shapes, Mapping):
        shapes = [shapes]
    out = []
    for b in shapes:
        if isinstance(b, str):
            out.append(parse_shape_spec(b))
        elif isinstance(b, Mapping):
            out.append({str(k): tuple(int(d) for d in v) for k, v in b.items()})
        else:
            raise UsageError(f"bad shape bucket {b!r}: expected a mapping input -> dims")
    return out


def input_dims(model) -> dict[str, list | None]:
    """A model's graph inputs and their dims (ints where fixed, names or None where symbolic)."""
    return {t.name: list(t.shape) if t.shape is not None else None for t in model.graph.inputs}


def _fixed(d) -> bool:
    return isinstance(d, (int, np.integer)) and d > 0


def _conflict(submodel: str, name: str, want: list | None, dims: tuple[int, ...]) -> str | None:
    if want is None:
        return None
    if len(want) != len(dims):
        return f"{submodel} input {name!r} has rank {len(want)}, not {len(dims)}"
    for i, (w, d) in enumerate(zip(want, dims)):
        if _fixed(w) and int(w) != d:
            return f"{submodel} input {name!r} has dim {i} fixed to {w}"
    return None


def shapes_for(bucket: Mapping[str, tuple], submodel: str, inputs: Mapping[str, list | None]) -> dict[str, tuple]:
    """The part of ``bucket`` that applies to ``submodel`` with graph ``inputs``: input name -> dims.

    Qualified keys for this submodel always apply (a conflict with a fixed dim is an error); bare
    names apply where they fit; qualified keys win over bare ones.
    """
    out: dict[str, tuple] = {}
    for key, dims in bucket.items():
        sub, name = split_key(key)
        if sub is None and name in inputs and _conflict(submodel, name, inputs[name], dims) is None:
            out.setdefault(name, tuple(dims))
    for key, dims in bucket.items():
        sub, name = split_key(key)
        if sub == submodel and name in inputs:
            why = _conflict(submodel, name, inputs[name], dims)
            if why:
                raise UsageError(f"--shape {key}={_fmt(dims)}: {why}")
            out[name] = tuple(dims)
    return out


def check_shape_names(buckets: Iterable[Mapping[str, tuple]], submodels: Mapping[str, Mapping[str, list | None]]) -> None:
    """Refuse (one line) unknown submodels and inputs, and bare names that fit no submodel."""
    for bucket in buckets:
        for key, dims in bucket.items():
            sub, name = split_key(key)
            if sub is not None:
                if sub not in submodels:
                    raise UsageError(f"--shape {key}: no submodel {sub!r} here (submodels: {', '.join(submodels)})")
                if name not in submodels[sub]:
                    raise UsageError(f"--shape {key}: {sub} has no input {name!r} (inputs: {', '.join(submodels[sub])})")
                continue
            having = [s for s, ins in submodels.items() if name in ins]
            if not having:
                known = sorted({i for ins in submodels.values() for i in ins})
                raise UsageError(f"--shape names unknown input {name!r} (inputs: {', '.join(known)})")
            why = [_conflict(s, name, submodels[s][name], dims) for s in having]
            if all(why):
                raise UsageError(f"--shape {name}={_fmt(dims)}: {why[0]}"
                                 + (f" (qualify it: --shape {having[0]}:{name}=...)" if len(having) > 1 else ""))


def derive_shapes(submodels: Mapping[str, Mapping[str, list | None]], height: int, width: int, batch: int = 1,
                  guidance_batch: int | None = None, vae_scale: int = 8) -> Bucket:
    """Qualified shapes for every symbolic dim of every submodel from one image size and batch.

    Text encoders: [batch, 77]; the UNet: its batch axis at ``guidance_batch`` (2 x batch for
    classifier-free guidance, 3 x batch for an 8-channel InstructPix2Pix UNet), latents
    height/8 x width/8, text sequences 77; a ControlNet as the UNet, its ``controlnet_cond``
    [guidance batch, 3, height, width]; ControlNet residuals with a ``height_divN`` dim the latent
    size / N (export names them so); the VAE decoder: [batch, C, height/8, width/8]; the VAE
    encoder: [batch, 3, height, width]. Dims fixed in the graph are kept as they are. A graph of no
    Stable Diffusion role (a plain ``model``) gets nothing: its symbolic dims need ``--shape``.
    """
    if height % vae_scale or width % vae_scale or height <= 0 or width <= 0 or batch <= 0:
        raise UsageError(f"--height/--width must be positive multiples of {vae_scale} and --batch positive "
                         f"(got {height}x{width}, batch {batch})")
    out: Bucket = {}
    for sub, inputs in submodels.items():
        if sub not in SUBMODELS:
            continue
        if sub in ("unet", "controlnet"):
            sample = inputs.get("sample") or next((d for d in inputs.values() if d is not None and len(d) == 4), None)
            channels = sample[1] if sample is not None and _fixed(sample[1]) else 4
            b = guidance_batch or (3 if channels == 8 else 2) * batch
        else:
            b = batch
        for name, dims in inputs.items():
            if dims is None or all(_fixed(d) for d in dims):
                continue
            image = sub == "vae_encoder" or name == "controlnet_cond"
            full = []
            for i, d in enumerate(dims):
                if _fixed(d):
                    full.append(int(d))
                elif i == 0:
                    full.append(b)
                elif len(dims) == 4 and i >= 2:
                    size = height if i == 2 else width
                    div = re.search(r"_div(\d+)$", str(d))
                    full.append(size if image else -(-(size // vae_scale) // int(div.group(1))) if div else size // vae_scale)
                elif len(dims) == 4 and i == 1:
                    full.append(3 if image else 4)
                else:
                    full.append(_TEXT_SEQ)
            out[f"{sub}:{name}"] = tuple(full)
    return out


def with_defaults(buckets: list[Bucket], derived: Bucket, submodels: Mapping[str, Mapping[str, list | None]]) -> list[Bucket]:
    """Each bucket completed by ``derived`` where the user named nothing for that submodel input."""
    out = []
    for bucket in buckets or [{}]:
        merged = dict(bucket)
        for key, dims in derived.items():
            sub, name = split_key(key)
            bare = bucket.get(name)
            if key in bucket or (bare is not None and _conflict(sub, name, submodels[sub][name], bare) is None):
                continue
            merged[key] = dims
        out.append(merged)
    return [b for b in out if b]


def size_hint(buckets: list[Bucket], submodels: Mapping[str, Mapping[str, list | None]], manifest: Mapping,
              height: int | None = None, width: int | None = None, batch: int | None = None) -> tuple[int, int, int]:
    """(height, width, batch) for ``derive_shapes``: the options, else what the given shapes imply, else the export's.

    A UNet latent ``unet:sample=2x4x64x64`` implies 512x512 at batch 1 (its batch is the guidance
    batch), a VAE decoder latent ``1x4x64x64`` the same, a VAE encoder image its own size.
    """
    scale = int(manifest.get("vae_scale_factor") or 8)
    implied: dict[str, int] = {}
    for bucket in buckets[:1]:
        for sub, inputs in submodels.items():
            given = shapes_for(bucket, sub, inputs)
            for dims in given.values():
                if len(dims) != 4:
                    continue
                if sub == "vae_encoder":
                    implied.setdefault("h", dims[2])
                    implied.setdefault("w", dims[3])
                    implied.setdefault("b", dims[0])
                elif sub in ("unet", "vae_decoder"):
                    implied.setdefault("h", dims[2] * scale)
                    implied.setdefault("w", dims[3] * scale)
                    per = (3 if dims[1] == 8 else 2) if sub == "unet" else 1
                    if dims[0] % per == 0:
                        implied.setdefault("b", dims[0] // per)
    h = height or (width if width and not implied.get("h") else None) or implied.get("h") or manifest.get("height") or 512
    w = width or (height if height and not implied.get("w") else None) or implied.get("w") or manifest.get("width") or 512
    return int(h), int(w), int(batch or implied.get("b") or manifest.get("batch") or 1)
