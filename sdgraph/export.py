"""Export a diffusers pipeline to an optimum-style ONNX model directory, checked against torch.

Families: SD 1.x, SD 2.x (epsilon and v-prediction), SDXL / SDXL-Turbo (two text encoders,
``text_time`` added conditioning), InstructPix2Pix (8-channel UNet), with a TAESD
(``AutoencoderTiny``) VAE when the pipeline carries one or ``vae=`` names one.

Submodel interfaces (names follow optimum):

==============  ===========================================  ====================================
submodel        inputs                                       outputs
==============  ===========================================  ====================================
text_encoder    input_ids int64 [B, 77]                      last_hidden_state, pooler_output
text_encoder_2  input_ids int64 [B, 77]                      last_hidden_state, text_embeds
controlnet      sample, timestep, encoder_hidden_states,    down_block_res_samples.{i} (N of
                controlnet_cond [B, 3, H, W] in [0, 1],      them), mid_block_res_sample
                conditioning_scale float [1] (+ SDXL's two)
unet            sample [B, C, h, w], timestep float [B],     out_sample
                encoder_hidden_states [B, 77, D]
                (+ text_embeds [B, P], time_ids [B, T] SDXL)
                (+ down_block_additional_residuals.{i},
                mid_block_additional_residual: ControlNet)
vae_decoder     latent_sample [B, 4, h, w]                   sample [B, 3, H, W]
vae_encoder     sample [B, 3, H, W]                          latent_sample [B, 4, h, w]
==============  ===========================================  ====================================

SDXL text encoders also output every layer's ``hidden_states.{i}`` (the pipeline uses the
penultimate one). ``vae_encoder`` outputs the *mean* of the latent distribution (its mode; a
TAESD encoder's latents directly): deterministic, so it can be checked. Scaling by the VAE's
``scaling_factor`` stays outside the graphs, as in diffusers; each submodel folder keeps its
``config.json``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sdgraph.errors import InputError, SdgraphError, TargetUnavailable, UnsupportedError, UsageError, VerificationError
from sdgraph.ir.modeldir import SUBMODELS, ModelDir
from sdgraph.manifest import read_json_object
from sdgraph.progress import task as progress_task

__all__ = [
    "EXPORTERS",
    "FAMILIES",
    "SUBMODELS",
    "DEFAULT_OPSET",
    "DEFAULT_TOLERANCE",
    "export_pipeline",
    "detect_family",
    "residual_shapes",
]

log = logging.getLogger(__name__)

EXPORTERS = ("legacy", "dynamo")
DEFAULT_OPSET = {"legacy": 17, "dynamo": 18}
LEGACY_MAX_OPSET = 20
SDPA_MIN_OPSET = 14  # torch's legacy exporter has scaled_dot_product_attention from opset 14
DEFAULT_TOLERANCE = 1e-3  # worst max_rel (max |onnx - torch| / max |torch|) an export may show
ATTENTION = ("sdpa", "classic")
PROMPT = "a photo of an astronaut riding a horse on mars"

# Pipeline classes by family; SD 1.x and 2.x share classes and are told apart by the UNet.
FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusionInstructPix2PixPipeline": "pix2pix",
    "StableDiffusionControlNetPipeline": "sd",
    "StableDiffusionXLControlNetPipeline": "sdxl",
}
_TORCH_CLASSES = {
    "text_encoder": {"CLIPTextModel", "CLIPTextModelWithProjection"},
    "text_encoder_2": {"CLIPTextModel", "CLIPTextModelWithProjection"},
    "unet": {"UNet2DConditionModel"},
    "vae": {"AutoencoderKL", "AutoencoderTiny"},
    "controlnet": {"ControlNetModel"},
}

Progress = Callable[[str, str, int, int], None]  # (submodel, stage, step, steps)
_STAGES = ("load", "export", "save", "verify")


# --------------------------------------------------------------------------- source
def _check_hub_reachable(spec: str) -> None:
    """Fail in one line, at once, when the hub's host does not even resolve (no network here)."""
    if os.environ.get("HF_HUB_OFFLINE"):
        return  # offline mode: the local hub cache answers
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    except ImportError:  # pragma: no cover - comes with diffusers
        host = "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        raise InputError(f"{spec}: not a local directory, and the hub ({host}) cannot be reached from here "
                         "to fetch it as a hub id") from None


class _Source:
    """Where the pipeline comes from: a local diffusers directory, or a hub id (needs a network)."""

    def __init__(self, src: str | os.PathLike):
        self.spec = str(src)
        path = Path(src)
        self.local = path.exists()
        if self.local:
            if not path.is_dir() or not (path / "model_index.json").is_file():
                raise InputError(f"{src}: not a diffusers pipeline directory (no model_index.json)")
            self.root: str = str(path.resolve())
            self.index = read_json_object(path / "model_index.json", "pipeline index")
        elif re.fullmatch(r"[\w.-]+/[\w.-]+", self.spec) and not self.spec.startswith((".", "/")):
            self.root = self.spec
            self.index = self._hub_index()
        else:
            raise InputError(f"{src}: no such directory (and not a hub id like org/name)")
        if not isinstance(self.index, dict) or "_class_name" not in self.index:
            raise InputError(f"{src}: model_index.json names no pipeline class")

    def _hub_index(self) -> dict:
        """model_index.json of a hub id: the code path where a network exists (tests use local dirs)."""
        _check_hub_reachable(self.spec)
        try:
            from diffusers import DiffusionPipeline

            with _quiet():
                return dict(DiffusionPipeline.load_config(self.spec))
        except Exception as exc:
            raise InputError(f"{self.spec}: cannot fetch the pipeline from the hub ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None

    def component(self, name: str) -> tuple[str, str] | None:
        spec = self.index.get(name)
        if not isinstance(spec, (list, tuple)) or len(spec) != 2 or spec[1] is None:
            return None
        return str(spec[0]), str(spec[1])

    def has_folder(self, name: str) -> bool:
        return not self.local or (Path(self.root) / name / "config.json").is_file()

    def folder(self, name: str) -> Path | None:
        return Path(self.root) / name if self.local else None


def detect_family(index: dict, unet_config: dict) -> str:
    """``sd1``, ``sd2``, ``sdxl`` or ``pix2pix`` from the pipeline class and the UNet config."""
    cls = index.get("_class_name", "?")
    fam = FAMILIES.get(cls)
    if fam is None:
        raise InputError(f"unknown pipeline family {cls!r}; sdgraph exports {', '.join(sorted(FAMILIES))}")
    if fam == "sd":
        sd2 = unet_config.get("use_linear_projection") or unet_config.get("cross_attention_dim") == 1024
        return "sd2" if sd2 else "sd1"
    return fam


# --------------------------------------------------------------------------- torch side
def _load_module(src: _Source, name: str, lib_cls: tuple[str, str], attention: str, path: str | None = None):
    """Load one torch component in fp32 from the source (or ``path`` for a --vae override)."""
    import torch

    lib, cls_name = lib_cls
    folder = name if name not in ("vae_override", "controlnet_override") else None
    allowed = _TORCH_CLASSES[{"vae_override": "vae", "controlnet_override": "controlnet"}.get(name, name)]
    if cls_name not in allowed:
        raise InputError(f"{name}: class {lib}.{cls_name} is not one sdgraph exports ({', '.join(sorted(allowed))})")
    where = path or src.root
    kw = {"subfolder": folder} if folder else {}
    try:
        if lib == "transformers":
            import transformers

            cls = getattr(transformers, cls_name)
            mod = cls.from_pretrained(where, dtype=torch.float32,
                                      attn_implementation="eager" if attention == "classic" else "sdpa", **kw)
        else:
            import diffusers

            cls = getattr(diffusers, cls_name)
            mod = cls.from_pretrained(where, torch_dtype=torch.float32, **kw)
            if attention == "classic" and hasattr(mod, "set_attn_processor"):
                from diffusers.models.attention_processor import AttnProcessor

                mod.set_attn_processor(AttnProcessor())
    except SdgraphError:
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise InputError(f"{where}{'/' + folder if folder else ''}: cannot load {cls_name} ({type(exc).__name__}: {first})") from None
    return mod.eval()


def _wrappers():
    """nn.Module wrappers giving each submodel plain tensor inputs and a fixed tuple of outputs."""
    import torch

    class TextEncoder(torch.nn.Module):
        def __init__(self, model, all_hidden: bool):
            super().__init__()
            self.model, self.all_hidden = model, all_hidden

        def forward(self, input_ids):
            out = self.model(input_ids=input_ids, output_hidden_states=self.all_hidden, return_dict=True)
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
            extra = tuple(out.hidden_states) if self.all_hidden else ()
            return (out.last_hidden_state, pooled) + extra

    class UNet(torch.nn.Module):
        def __init__(self, model, xl: bool):
            super().__init__()
            self.model, self.xl = model, xl

        def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
            added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.xl else None
            return self.model(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]

    class VaeDecoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, latent_sample):
            return self.model.decode(latent_sample, return_dict=False)[0]

    class VaeEncoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, sample):
            out = self.model.encode(sample, return_dict=True)
            if hasattr(out, "latent_dist"):
                return out.latent_dist.mean
            return out.latents

    return TextEncoder, UNet, VaeDecoder, VaeEncoder


class _Spec:
    """One submodel to export: its torch wrapper, names, example inputs and dynamic axes."""

    def __init__(self, name: str, module, inputs: dict[str, np.ndarray], outputs: list[str],
                 dynamic_axes: dict[str, dict[int, str]], config: dict):
        self.name, self.module, self.inputs, self.outputs = name, module, inputs, outputs
        self.dynamic_axes, self.config = dynamic_axes, config


def _tokens(tokenizer, batch: int) -> np.ndarray:
    prompts = [PROMPT if i == 0 else f"{PROMPT}, variant {i}" for i in range(batch)]
    if tokenizer is None:
        return np.random.default_rng(0).integers(0, 256, size=(batch, 77)).astype(np.int64)
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    return ids.astype(np.int64)


def _vae_scale(vae_config: dict) -> int:
    return 2 ** (len(vae_config.get("block_out_channels", (0, 0, 0, 0))) - 1)


def _make_inputs(name: str, geo: dict, batch: int, seed: int, tokenizer=None) -> dict[str, np.ndarray]:
    """Seeded example inputs for one submodel at ``batch`` (shapes from ``geo``)."""
    rng = np.random.default_rng(seed)
    h, w, lh, lw = geo["height"], geo["width"], geo["height"] // geo["scale"], geo["width"] // geo["scale"]
    if name.startswith("text_encoder"):
        return {"input_ids": _tokens(tokenizer, batch)}
    if name == "unet":
        feeds = {
            "sample": rng.standard_normal((batch, geo["in_channels"], lh, lw)).astype(np.float32),
            "timestep": np.full((batch,), 999.0 if seed % 2 == 0 else 501.0, dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, 77, geo["cross_dim"])).astype(np.float32),
        }
        if geo.get("text_embeds_dim"):
            feeds["text_embeds"] = rng.standard_normal((batch, geo["text_embeds_dim"])).astype(np.float32)
            ids = ([h, w, 0, 0, h, w] + [6.0] * geo["time_ids_dim"])[: geo["time_ids_dim"]]
            feeds["time_ids"] = np.tile(np.asarray(ids, dtype=np.float32), (batch, 1))
        if geo.get("residuals"):
            feeds.update(_residual_inputs(geo, batch, rng))
        return feeds
    if name == "controlnet":
        return _controlnet_inputs(geo, batch, seed)
    if name == "vae_decoder":
        return {"latent_sample": rng.standard_normal((batch, geo["latent_channels"], lh, lw)).astype(np.float32)}
    return {"sample": rng.uniform(-1, 1, (batch, 3, h, w)).astype(np.float32)}


def _dynamic_axes(name: str, outputs: list[str], xl: bool) -> dict[str, dict[int, str]]:
    if name.startswith("text_encoder"):
        axes = {"input_ids": {0: "batch"}}
        axes.update({o: {0: "batch"} for o in outputs})
        return axes
    if name == "unet":
        axes = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
                "encoder_hidden_states": {0: "batch"}, "out_sample": {0: "batch", 2: "height", 3: "width"}}
        if xl:
            axes.update({"text_embeds": {0: "batch"}, "time_ids": {0: "batch"}})
        return axes
    if name == "controlnet":
        return _controlnet_axes(outputs, xl)
    latent = {0: "batch", 2: "height", 3: "width"}
    image = {0: "batch", 2: "image_height", 3: "image_width"}
    if name == "vae_decoder":
        return {"latent_sample": latent, "sample": image}
    return {"sample": image, "latent_sample": latent}


# --------------------------------------------------------------------------- exporters
@contextlib.contextmanager
def _quiet():
    """Keep torch's and onnxscript's exporter chatter (warnings, banners) out of the user's terminal."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "torch.fx", "huggingface_hub")
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, lvl in saved.items():
            logging.getLogger(n).setLevel(lvl)


def _opset_error(exc: Exception, exporter: str, opset: int) -> SdgraphError:
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "scaled_dot_product_attention" in msg:
        return UsageError(_sdpa_message(opset))
    return UnsupportedError(f"the {exporter} exporter cannot export this model at opset {opset}: {msg}")


def _sdpa_message(opset: int) -> str:
    return (f"opset {opset} is too old for torch's legacy exporter with the default attention "
            f"(scaled_dot_product_attention needs opset {SDPA_MIN_OPSET}); use --opset {SDPA_MIN_OPSET} or later, "
            "or --attention classic to export diffusers' classic AttnProcessor at this opset")


def _torch_export(spec: _Spec, work: Path, exporter: str, opset: int, dynamic: bool) -> Path:
    """Run torch's exporter into ``work``; returns the .onnx it wrote (weights in whatever layout)."""
    import torch

    args = tuple(torch.from_numpy(v) for v in spec.inputs.values())
    names = list(spec.inputs)
    target = work / "model.onnx"
    with _quiet(), torch.no_grad():
        try:
            if exporter == "legacy":
                torch.onnx.export(
                    spec.module, args, str(target), dynamo=False, opset_version=opset, input_names=names,
                    output_names=spec.outputs, dynamic_axes=spec.dynamic_axes if dynamic else None,
                    do_constant_folding=True,
                )
            else:
                try:
                    import onnxscript  # noqa: F401
                except ImportError:
                    raise TargetUnavailable("the dynamo exporter needs onnxscript: pip install onnxscript "
                                            "(or use --exporter legacy)") from None
                program = torch.onnx.export(
                    spec.module, args, dynamo=True, opset_version=opset, input_names=names,
                    output_names=spec.outputs, dynamic_axes=spec.dynamic_axes if dynamic else None,
                    verbose=False, optimize=True,
                )
                program.save(str(target), external_data=True)
        except SdgraphError:
            raise
        except torch.onnx.errors.UnsupportedOperatorError as exc:
            raise _opset_error(exc, exporter, opset) from None
        except Exception as exc:
            if "opset" in str(exc).lower() or "scaled_dot_product_attention" in str(exc):
                raise _opset_error(exc, exporter, opset) from None
            raise UnsupportedError(f"{spec.name}: torch's {exporter} exporter failed: {type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    return target


def _finalize(raw: Path, out_file: Path, name: str, opset: int, exporter: str) -> dict:
    """Rewrite torch's output as ``model.onnx`` + one ``model.onnx_data``; IR version ORT accepts."""
    import onnx

    from sdgraph.ir import io

    proto, base = io.load_proto(raw)
    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:
        raise UsageError(f"the {exporter} exporter cannot produce opset {opset} for {name} (it wrote opset {got}); "
                         f"use --opset {got}" + (" or --exporter legacy" if exporter == "dynamo" else ""))
    proto.ir_version = min(proto.ir_version, io.MAX_IR_VERSION)
    del proto.metadata_props[:]
    proto.metadata_props.add(key="sdgraph.role", value=name)
    proto.producer_name = proto.producer_name or "pytorch"
    params = sum(int(np.prod(t.dims)) if t.dims else 1 for t in proto.graph.initializer)
    info = {
        "nodes": len(proto.graph.node),
        "parameters": params,
        "inputs": [_value_info(v) for v in proto.graph.input],
        "outputs": [_value_info(v) for v in proto.graph.output],
    }
    io.write_proto(proto, out_file, base)
    del proto
    onnx.checker.check_model(str(out_file))  # path form: works past 2 GB with external data
    return info


def _value_info(v) -> dict:
    import onnx

    t = v.type.tensor_type
    dims = [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
            for d in t.shape.dim]
    return {"name": v.name, "shape": dims, "dtype": str(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))}


def _verify(spec: _Spec, model_file: Path, feeds_list: list[dict[str, np.ndarray]], tolerance: float) -> dict:
    """Run ORT and torch on the same seeded inputs; raise VerificationError beyond ``tolerance``."""
    import torch

    from sdgraph.ir.runtime import compare, session, worst

    sess = session(model_file)
    ort_inputs = {i.name for i in sess.get_inputs()}
    reports = []
    for feeds in feeds_list:
        with torch.no_grad():
            ref = spec.module(*(torch.from_numpy(v) for v in feeds.values()))
        ref = ref if isinstance(ref, tuple) else (ref,)
        ref_np = {n: r.detach().numpy() for n, r in zip(spec.outputs, ref)}
        got = sess.run(spec.outputs, {k: v for k, v in feeds.items() if k in ort_inputs})
        reports.append(compare(ref_np, dict(zip(spec.outputs, got))))
    merged: dict[str, dict] = {}
    for rep in reports:  # worst over the checked shapes, per output
        for out, r in rep.items():
            m = merged.setdefault(out, dict(r))
            for k in ("max_abs", "max_rel", "mean_abs"):
                m[k] = max(m[k], r[k])
            m["cosine"] = min(m["cosine"], r["cosine"])
            m["finite"] = m["finite"] and r["finite"]
    w = worst(merged)
    bad = [o for o, r in merged.items() if not r["finite"] or not r["max_rel"] <= tolerance]
    if bad:
        r = merged[bad[0]]
        raise VerificationError(
            f"{spec.name}: ONNX output {bad[0]!r} does not match torch: max_rel {r['max_rel']:.3g} > {tolerance:g} "
            f"(max_abs {r['max_abs']:.3g}, cosine {r['cosine']:.6f}, finite {r['finite']})")
    return {"tolerance": tolerance, "shapes_checked": [{k: list(v.shape) for k, v in f.items()} for f in feeds_list],
            "outputs": merged, "worst": w}


# --------------------------------------------------------------------------- driver
def _check_args(exporter, opset, batch, height, width, submodels, attention, tolerance) -> tuple[int, list[str] | None]:
    if exporter not in EXPORTERS:
        raise UsageError(f"unknown exporter {exporter!r}; choose legacy or dynamo")
    if attention not in ATTENTION:
        raise UsageError(f"unknown attention {attention!r}; choose sdpa or classic")
    opset = DEFAULT_OPSET[exporter] if opset is None else int(opset)
    if opset < 9 or opset > 23:
        raise UsageError(f"opset {opset} is outside what torch exports (9..23)")
    if exporter == "legacy" and opset > LEGACY_MAX_OPSET:
        raise UsageError(f"torch's legacy exporter goes up to opset {LEGACY_MAX_OPSET}, not {opset}; "
                         f"use --opset {LEGACY_MAX_OPSET} or --exporter dynamo")
    if exporter == "legacy" and opset < SDPA_MIN_OPSET and attention == "sdpa":
        raise UsageError(_sdpa_message(opset))
    if batch < 1:
        raise UsageError(f"batch must be at least 1, not {batch}")
    for label, v in (("height", height), ("width", width)):
        if v is not None and (v < 8 or v % 8):
            raise UsageError(f"{label} must be a positive multiple of 8, not {v}")
    if not tolerance > 0:
        raise UsageError(f"tolerance must be positive, not {tolerance}")
    if submodels is not None:
        if isinstance(submodels, str):
            submodels = [s.strip() for s in submodels.split(",") if s.strip()]
        unknown = [s for s in submodels if s not in SUBMODELS]
        if unknown or not submodels:
            raise UsageError(f"unknown submodel {', '.join(unknown) or '(none given)'}; choose from {', '.join(SUBMODELS)}")
        submodels = list(dict.fromkeys(submodels))
    return opset, submodels


def _check_out(out: Path, src: _Source, force: bool, vae: str | os.PathLike | None = None) -> None:
    from sdgraph.ir.outputs import guard_output

    inputs = [Path(src.root)] if src.local else []
    if vae is not None and Path(vae).exists():
        inputs.append(Path(vae))
    guard_output(out, inputs, force=force)
    if out.exists() and not out.is_dir() and not force:
        raise InputError(f"{out}: exists and is not a directory")


def _plan(src: _Source, submodels: list[str] | None, vae_override: str | None,
          controlnet_override: str | None = None) -> list[str]:
    """Submodels to export, checking that the source has each one's folder."""
    present = []
    if src.component("controlnet") or controlnet_override:
        present.append("controlnet")
    for name in ("text_encoder", "text_encoder_2", "unet"):
        if src.component(name):
            present.append(name)
    if src.component("vae") or vae_override:
        present += ["vae_encoder", "vae_decoder"]
    if "unet" not in present:
        raise InputError(f"{src.spec}: model_index.json lists no unet; not a Stable Diffusion pipeline")
    wanted = present if submodels is None else submodels
    for name in wanted:
        if name not in present:
            raise InputError(f"{src.spec}: the pipeline has no {name} (it has {', '.join(present)})")
        folder = "vae" if name.startswith("vae") else name
        if folder == "vae" and vae_override or folder == "controlnet" and controlnet_override:
            continue
        if not src.has_folder(folder):
            raise InputError(f"{src.spec}: missing submodel folder {folder}/ (model_index.json lists it; "
                             f"no {folder}/config.json)")
    return [n for n in SUBMODELS if n in wanted]


def _read_config(src: _Source, folder: str, override: str | None = None) -> dict:
    if override is not None:
        path = Path(override)
        if not path.exists():
            if not re.fullmatch(r"[\w.-]+/[\w.-]+", override):
                raise InputError(f"{override}: no such VAE directory")
            _check_hub_reachable(override)
            try:
                from diffusers import AutoencoderTiny

                with _quiet():
                    return dict(AutoencoderTiny.load_config(override))
            except Exception as exc:
                raise InputError(f"{override}: cannot fetch the VAE from the hub ({type(exc).__name__})") from None
        cfg = path / "config.json"
        if not cfg.is_file():
            raise InputError(f"{override}: not a diffusers VAE directory (no config.json)")
        return read_json_object(cfg, "VAE config")
    if src.local:
        return read_json_object(Path(src.root) / folder / "config.json", f"{folder} config")
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(src.spec, "config.json", subfolder=folder)).read_text())
    except Exception as exc:
        raise InputError(f"{src.spec}/{folder}: cannot fetch config.json ({type(exc).__name__})") from None


def export_pipeline(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    exporter: str = "legacy",
    opset: int | None = None,
    batch: int = 1,
    height: int | None = None,
    width: int | None = None,
    dynamic: bool = False,
    submodels: list[str] | str | None = None,
    vae: str | os.PathLike | None = None,
    force: bool = False,
    progress: Progress | None = None,
    attention: str = "sdpa",
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    controlnet: str | os.PathLike | None = None,
) -> dict:
    """Export ``src`` (a diffusers pipeline directory or hub id) to ``out_dir``; return the manifest.

    Every submodel is exported with torch's ``exporter`` at ``opset`` (fp32), rewritten as
    ``<submodel>/model.onnx`` + ``model.onnx_data``, then run in ONNX Runtime on seeded inputs and
    compared with the torch module; a worst ``max_rel`` above ``tolerance`` raises
    VerificationError. ``batch``/``height``/``width`` fix the example shapes (static unless
    ``dynamic``: then batch, height and width are symbolic and a second batch size is checked too).
    ``controlnet`` (a diffusers ``ControlNetModel`` folder) adds a ``controlnet`` submodel, as a
    ControlNet pipeline's own ``controlnet/`` does; either way the UNet then takes the residuals.
    ``out_dir`` appears only when everything succeeded.
    """
    opset, submodels = _check_args(exporter, opset, batch, height, width, submodels, attention, tolerance)
    source = _Source(src)
    out = Path(out_dir)
    _check_out(out, source, force, vae)
    cn_override = _controlnet_override(controlnet)
    if cn_override and source.component("controlnet"):
        raise UsageError(f"{src} already has a controlnet/; --controlnet replaces none (export without it, or "
                         "from the base pipeline)")
    unet_cfg = _read_config(source, "unet") if source.has_folder("unet") else {}
    family = detect_family(source.index, unet_cfg)
    vae_override = (str(Path(vae).resolve()) if Path(vae).exists() else str(vae)) if vae is not None else None
    names = _plan(source, submodels, vae_override, cn_override)
    vae_cfg = _read_config(source, "vae", vae_override) if any(n.startswith("vae") for n in names) or \
        source.component("vae") else {}
    if vae_override and vae_cfg.get("_class_name") not in _TORCH_CLASSES["vae"]:
        raise InputError(f"{vae}: config names {vae_cfg.get('_class_name')!r}, not a VAE sdgraph exports "
                         "(AutoencoderKL, AutoencoderTiny)")
    geo = _geometry(source, unet_cfg, vae_cfg, height, width)
    if source.component("controlnet") or cn_override:
        geo.update(_controlnet_geometry(source, cn_override, unet_cfg, geo))
    prediction = _scheduler_config(source).get("prediction_type", "epsilon")
    notify = progress or (lambda *a: None)
    manifest: dict[str, Any] = {}
    with ModelDir.create(out, force=force) as new:
        tmp = new.path
        tokenizers = _copy_assets(source, tmp, vae_override, vae_cfg, cn_override)
        results = {}
        with progress_task("export", total=len(names)) as bar:
            def staged(name: str, stage: str, step: int, steps: int) -> None:
                bar.update(description=f"export {name}: {stage}")
                notify(name, stage, step, steps)

            for name in names:
                results[name] = _export_one(source, name, tmp, geo, tokenizers, exporter, opset, batch, dynamic,
                                            attention, tolerance, seed, vae_override, family, staged, cn_override)
                bar.advance()
        manifest = _manifest(source, vae_override, family, prediction, exporter, opset, batch, geo, dynamic,
                             attention, tolerance, seed, vae_cfg, results, tokenizers)
        if geo.get("residuals"):
            manifest["controlnet"] = _controlnet_manifest(geo, cn_override)
        new.write_manifest(manifest)
    log.info("exported %s (%s) to %s", src, family, out)
    return manifest


def _geometry(src: _Source, unet_cfg: dict, vae_cfg: dict, height: int | None, width: int | None) -> dict:
    scale = _vae_scale(vae_cfg) if vae_cfg else 8
    sample = unet_cfg.get("sample_size", 64)
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    h = height or sample * scale
    w = width or sample * scale
    for label, v in (("height", h), ("width", w)):
        if v % scale:
            raise UsageError(f"{label} {v} is not a multiple of the VAE's scale factor {scale}")
    geo = {"height": h, "width": w, "scale": scale, "in_channels": unet_cfg.get("in_channels", 4),
           "cross_dim": unet_cfg.get("cross_attention_dim", 768),
           "latent_channels": vae_cfg.get("latent_channels", 4), "text_embeds_dim": 0, "time_ids_dim": 0}
    if unet_cfg.get("addition_embed_type") == "text_time":
        te2 = _read_config(src, "text_encoder_2") if src.component("text_encoder_2") and src.has_folder("text_encoder_2") else {}
        proj = te2.get("projection_dim") or te2.get("hidden_size") or 1280
        total = unet_cfg.get("projection_class_embeddings_input_dim") or proj + 6 * 256
        geo["text_embeds_dim"] = proj
        geo["time_ids_dim"] = (total - proj) // unet_cfg.get("addition_time_embed_dim", 256)
    return geo


def _scheduler_config(src: _Source) -> dict:
    if src.local:
        p = Path(src.root) / "scheduler" / "scheduler_config.json"
        return read_json_object(p, "scheduler config") if p.is_file() else {}
    return {}


def _copy_assets(src: _Source, tmp: Path, vae_override: str | None, vae_cfg: dict,
                 controlnet_override: str | None = None) -> dict:
    """Copy tokenizer(s), scheduler and model_index.json; return loaded tokenizers by folder."""
    tokenizers = {}
    for folder in ("tokenizer", "tokenizer_2", "scheduler"):
        if not src.component(folder):
            continue
        if src.local and (Path(src.root) / folder).is_dir():
            from sdgraph.ir.io import copy_inside

            copy_inside(Path(src.root) / folder, tmp / folder, Path(src.root))  # a diffusers folder, not a ModelDir
        if folder.startswith("tokenizer"):
            tok = _load_tokenizer(src, folder)
            if tok is not None:
                tokenizers[folder] = tok
                if not src.local:
                    tok.save_pretrained(tmp / folder)
        elif not src.local:  # hub: re-save the scheduler config
            import diffusers

            cls = getattr(diffusers, src.component(folder)[1])
            cls.from_pretrained(src.root, subfolder=folder).save_pretrained(tmp / folder)
    index = dict(src.index)
    if vae_override:
        index["vae"] = ["diffusers", vae_cfg.get("_class_name", "AutoencoderTiny")]
    if controlnet_override:
        index["controlnet"] = ["diffusers", "ControlNetModel"]
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return tokenizers


def _load_tokenizer(src: _Source, folder: str):
    lib_cls = src.component(folder)
    try:
        import transformers

        cls = getattr(transformers, lib_cls[1], None) or transformers.AutoTokenizer
        return cls.from_pretrained(src.root, subfolder=folder)
    except Exception as exc:  # a pipeline with a broken tokenizer still exports; parity uses random ids
        log.warning("%s: tokenizer not loadable (%s); parity uses random token ids", folder, exc)
        return None


def _export_one(src: _Source, name: str, tmp: Path, geo: dict, tokenizers: dict, exporter: str, opset: int,
                batch: int, dynamic: bool, attention: str, tolerance: float, seed: int, vae_override: str | None,
                family: str, notify: Progress, controlnet_override: str | None = None) -> dict:
    TextEncoder, UNet, VaeDecoder, VaeEncoder = _wrappers()
    steps = len(_STAGES)
    notify(name, "load", 0, steps)
    folder = "vae" if name.startswith("vae") else name
    if folder == "vae" and vae_override:
        cfg = _read_config(src, "vae", vae_override)
        module = _load_module(src, "vae_override", ("diffusers", cfg["_class_name"]), attention, path=vae_override)
    elif name == "controlnet" and controlnet_override:
        module = _load_module(src, "controlnet_override", ("diffusers", "ControlNetModel"), attention,
                              path=controlnet_override)
    else:
        module = _load_module(src, folder, src.component(folder), attention)
    config = dict(module.config) if not hasattr(module.config, "to_dict") else module.config.to_dict()
    tok = tokenizers.get("tokenizer_2" if name == "text_encoder_2" else "tokenizer")
    if name.startswith("text_encoder"):
        xl_hidden = family == "sdxl"
        n_layers = module.config.num_hidden_layers
        wrapper = TextEncoder(module, xl_hidden)
        pooled = "text_embeds" if type(module).__name__.endswith("WithProjection") else "pooler_output"
        outputs = ["last_hidden_state", pooled] + ([f"hidden_states.{i}" for i in range(n_layers + 1)] if xl_hidden else [])
    elif name == "controlnet":
        wrapper, outputs = _controlnet_wrapper(module, geo)
    elif name == "unet" and geo.get("residuals"):
        wrapper, outputs = _controlled_unet_wrapper(module, geo)
    elif name == "unet":
        wrapper, outputs = UNet(module, bool(geo["text_embeds_dim"])), ["out_sample"]
    elif name == "vae_decoder":
        wrapper, outputs = VaeDecoder(module), ["sample"]
    else:
        wrapper, outputs = VaeEncoder(module), ["latent_sample"]
    wrapper.eval()
    feeds = _make_inputs(name, geo, batch, seed, tok)
    axes = _dynamic_axes(name, outputs, bool(geo["text_embeds_dim"]))
    if name in ("unet", "controlnet") and geo.get("residuals"):
        axes.update(_residual_axes(geo, name))
    spec = _Spec(name, wrapper, feeds, outputs, axes, config)
    notify(name, "export", 1, steps)
    work = tmp / f".work-{name}"
    work.mkdir()
    t0 = time.perf_counter()
    raw = _torch_export(spec, work, exporter, opset, dynamic)
    notify(name, "save", 2, steps)
    sub = tmp / name
    sub.mkdir()
    info = _finalize(raw, sub / "model.onnx", name, opset, exporter)
    info["params_mapped"] = _record_param_map(module, sub / "model.onnx")
    seconds = time.perf_counter() - t0
    shutil.rmtree(work)
    (sub / "config.json").write_text(json.dumps(_jsonable(config), indent=2, default=str) + "\n")
    notify(name, "verify", 3, steps)
    checks = [feeds]
    if dynamic:
        checks.append(_make_inputs(name, geo, batch + 1, seed + 1, tok))
    parity = _verify(spec, sub / "model.onnx", checks, tolerance)
    from sdgraph.manifest import file_hash

    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_hash(p)} for p in sorted(sub.iterdir())
             if p.name.startswith("model.onnx")}
    info.update({
        "path": f"{name}/model.onnx",
        "class": type(module).__name__,
        "files": files,
        "bytes": sum(f["bytes"] for f in files.values()),
        "export_seconds": round(seconds, 3),
        "parity": parity,
    })
    notify(name, "done", steps, steps)
    del spec, wrapper, module
    gc.collect()  # a full-size UNet is 3.4 GB of torch weights: free it before the next submodel
    return info


def _record_param_map(module, model_file: Path) -> int:
    """Write which torch parameter became which initializer (and whether transposed) into the model's
    ``sdgraph.params`` metadata, matched by content; the ``lora`` pass and ``refit`` read it. Returns the count."""
    import hashlib

    import onnx

    from sdgraph.ir import io
    from sdgraph.ir.lora import PARAMS_KEY
    from sdgraph.ir.proto import is_external

    proto = onnx.load(str(model_file), load_external_data=False)
    by_content: dict[tuple, str] = {}
    for t in proto.graph.initializer:
        if len(t.dims) in (2, 4) and t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            raw = io.read_external(t, model_file.parent) if is_external(t) else t.raw_data
            by_content.setdefault((tuple(t.dims), t.data_type, hashlib.sha1(raw).digest()), t.name)
    params: dict[str, list] = {}
    for pname, p in module.named_parameters():
        if p.dim() not in (2, 4):
            continue
        w = p.detach().cpu().numpy()
        dtype = onnx.TensorProto.FLOAT16 if w.dtype == np.float16 else onnx.TensorProto.FLOAT
        layouts = [(w, False)] + ([(np.ascontiguousarray(w.T), True)] if w.ndim == 2 else [])
        for arr, transposed in layouts:
            hit = by_content.get((arr.shape, dtype, hashlib.sha1(arr.tobytes()).digest()))
            if hit is not None:
                params[pname] = [hit, transposed]
                break
    proto.metadata_props.add(key=PARAMS_KEY, value=json.dumps({"version": 1, "params": params}, separators=(",", ":")))
    onnx.save(proto, str(model_file))
    return len(params)


def _jsonable(cfg: dict) -> dict:
    return json.loads(json.dumps(cfg, default=lambda o: list(o) if isinstance(o, (tuple, set)) else str(o)))


def _manifest(src: _Source, vae_override, family, prediction, exporter, opset, batch, geo, dynamic, attention,
              tolerance, seed, vae_cfg, results, tokenizers) -> dict:
    from sdgraph._version import __version__
    from sdgraph.ir.io import MAX_IR_VERSION
    from sdgraph.manifest import package_versions

    return {
        "kind": "model",
        "created_by": f"sdgraph {__version__} export",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": {"path": src.spec if not src.local else str(Path(src.root)), "hub": not src.local,
                   "pipeline_class": src.index.get("_class_name"), "vae": vae_override},
        "family": family,
        "prediction_type": prediction,
        "exporter": exporter,
        "opset": opset,
        "ir_version_max": MAX_IR_VERSION,
        "attention": attention,
        "dtype": "float32",
        "batch": batch,
        "height": geo["height"],
        "width": geo["width"],
        "vae_scale_factor": geo["scale"],
        "dynamic": dynamic,
        "dynamic_axes": ["batch", "height", "width"] if dynamic else [],
        "vae": {"class": vae_cfg.get("_class_name"), "scaling_factor": vae_cfg.get("scaling_factor"),
                "shift_factor": vae_cfg.get("shift_factor"), "encoder_output": "latent distribution mean"
                if vae_cfg.get("_class_name") == "AutoencoderKL" else "latents"} if vae_cfg else None,
        "tokenizers": sorted(tokenizers),
        "scheduler": "scheduler" if src.component("scheduler") else None,
        "parity": {"seed": seed, "tolerance": tolerance, "metric": "max_rel = max|onnx - torch| / max|torch|"},
        "submodels": results,
        "passes": [],
        "packages": package_versions(),
    }


# --------------------------------------------------------------------------- ControlNet
# UNet inputs that take a ControlNet's residuals, and the ControlNet outputs that make them.
RESIDUAL_INPUT = "down_block_additional_residuals.{}"
MID_RESIDUAL_INPUT = "mid_block_additional_residual"
RESIDUAL_OUTPUT = "down_block_res_samples.{}"
MID_RESIDUAL_OUTPUT = "mid_block_res_sample"


def _controlnet_override(path: str | os.PathLike | None) -> str | None:
    """``--controlnet DIR``: a local diffusers ControlNetModel folder (resolved), checked here."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{path}: no such ControlNet directory (a diffusers ControlNetModel folder)")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise InputError(f"{path}: not a diffusers ControlNet directory (no config.json)")
    cls = read_json_object(cfg, "ControlNet config").get("_class_name")
    if cls not in _TORCH_CLASSES["controlnet"]:
        raise InputError(f"{path}: config names {cls!r}, not a ControlNet sdgraph exports (ControlNetModel)")
    return str(p.resolve())


def residual_shapes(unet_cfg: dict, latent_h: int, latent_w: int) -> list[tuple[int, int, int]]:
    """(channels, height, width) of each down-block residual, then the mid block's, for a UNet config.

    The order of diffusers' ``down_block_res_samples``: conv_in, each resnet of each down block,
    then its downsampler (all blocks but the last); a stride-2 conv rounds odd sizes up.
    """
    chans = list(unet_cfg.get("block_out_channels", (320, 640, 1280, 1280)))
    lpb = unet_cfg.get("layers_per_block", 2)
    lpb = list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * len(chans)
    h, w = latent_h, latent_w
    out = [(chans[0], h, w)]
    for i, c in enumerate(chans):
        out += [(c, h, w)] * lpb[i]
        if i < len(chans) - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            out.append((c, h, w))
    return out + [(chans[-1], h, w)]


def _controlnet_geometry(src: _Source, override: str | None, unet_cfg: dict, geo: dict) -> dict:
    """Residual shapes at the export size; the ControlNet must fit the UNet (same down blocks)."""
    cn_cfg = read_json_object(Path(override) / "config.json", "ControlNet config") if override else \
        _read_config(src, "controlnet")
    lh, lw = geo["height"] // geo["scale"], geo["width"] // geo["scale"]
    shapes = residual_shapes(unet_cfg, lh, lw)
    theirs = residual_shapes({**cn_cfg, "block_out_channels": cn_cfg.get("block_out_channels", (320, 640, 1280, 1280))},
                             lh, lw)
    if shapes != theirs or cn_cfg.get("cross_attention_dim", 1280) != unet_cfg.get("cross_attention_dim", 1280):
        raise InputError(f"{override or src.spec + '/controlnet'}: the ControlNet does not fit this UNet "
                         f"(down blocks {cn_cfg.get('block_out_channels')} x {cn_cfg.get('layers_per_block')}, "
                         f"cross-attention {cn_cfg.get('cross_attention_dim')}; the UNet has "
                         f"{unet_cfg.get('block_out_channels')} x {unet_cfg.get('layers_per_block')}, "
                         f"{unet_cfg.get('cross_attention_dim')})")
    return {"residuals": shapes, "controlnet_source": override or "controlnet"}


def _controlnet_manifest(geo: dict, override: str | None) -> dict:
    n = len(geo["residuals"]) - 1
    return {"source": override or "controlnet/", "down_residuals": n,
            "unet_inputs": [RESIDUAL_INPUT.format(i) for i in range(n)] + [MID_RESIDUAL_INPUT],
            "outputs": [RESIDUAL_OUTPUT.format(i) for i in range(n)] + [MID_RESIDUAL_OUTPUT]}


def _controlnet_inputs(geo: dict, batch: int, seed: int) -> dict[str, np.ndarray]:
    """The UNet's example inputs plus a control image in [0, 1] and a conditioning scale."""
    unet = _make_inputs("unet", {**geo, "residuals": None}, batch, seed)
    rng = np.random.default_rng(seed + 7)
    feeds = {k: unet[k] for k in ("sample", "timestep", "encoder_hidden_states")}
    feeds["controlnet_cond"] = rng.uniform(0, 1, (batch, 3, geo["height"], geo["width"])).astype(np.float32)
    feeds["conditioning_scale"] = np.array([0.8 if seed % 2 == 0 else 1.0], dtype=np.float32)
    for k in ("text_embeds", "time_ids"):
        if k in unet:
            feeds[k] = unet[k]
    return feeds


def _residual_inputs(geo: dict, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    shapes = geo["residuals"]
    names = [RESIDUAL_INPUT.format(i) for i in range(len(shapes) - 1)] + [MID_RESIDUAL_INPUT]
    return {n: rng.standard_normal((batch, *s)).astype(np.float32) for n, s in zip(names, shapes)}


def _residual_axes(geo: dict, name: str) -> dict[str, dict[int, str]]:
    """Symbolic residual dims; ``height_div4`` says the residual is the latent height / 4 (shape_spec reads it)."""
    shapes = geo["residuals"]
    n = len(shapes) - 1
    names = ([RESIDUAL_INPUT.format(i) for i in range(n)] + [MID_RESIDUAL_INPUT] if name == "unet" else
             [RESIDUAL_OUTPUT.format(i) for i in range(n)] + [MID_RESIDUAL_OUTPUT])
    lh = shapes[0][1]
    axes = {}
    for rname, (_, h, _w) in zip(names, shapes):
        f = max(1, round(lh / h))
        axes[rname] = {0: "batch", 2: "height" if f == 1 else f"height_div{f}", 3: "width" if f == 1 else f"width_div{f}"}
    if name == "controlnet":
        axes["controlnet_cond"] = {0: "batch", 2: "image_height", 3: "image_width"}
    return axes


def _controlnet_axes(outputs: list[str], xl: bool) -> dict[str, dict[int, str]]:
    axes = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
            "encoder_hidden_states": {0: "batch"}}
    if xl:
        axes.update({"text_embeds": {0: "batch"}, "time_ids": {0: "batch"}})
    return axes


def _controlnet_wrapper(module, geo: dict):
    """The ControlNet with plain tensor inputs (SDXL's added conditions last) and one output per residual."""
    import torch

    xl = bool(geo["text_embeds_dim"])

    class ControlNet(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale,
                    text_embeds=None, time_ids=None):
            added = {"text_embeds": text_embeds, "time_ids": time_ids} if xl else None
            down, mid = self.model(sample, timestep, encoder_hidden_states, controlnet_cond=controlnet_cond,
                                   conditioning_scale=conditioning_scale, added_cond_kwargs=added, return_dict=False)
            return tuple(down) + (mid,)

    n = len(geo["residuals"]) - 1
    return ControlNet(module), [RESIDUAL_OUTPUT.format(i) for i in range(n)] + [MID_RESIDUAL_OUTPUT]


def _controlled_unet_wrapper(module, geo: dict):
    """The UNet taking the ControlNet residuals as separate inputs after its own."""
    import torch

    xl = bool(geo["text_embeds_dim"])
    n = len(geo["residuals"]) - 1

    class ControlledUNet(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, sample, timestep, encoder_hidden_states, *rest):
            added = None
            if xl:
                added, rest = {"text_embeds": rest[0], "time_ids": rest[1]}, rest[2:]
            return self.model(sample, timestep, encoder_hidden_states, added_cond_kwargs=added,
                              down_block_additional_residuals=tuple(rest[:n]),
                              mid_block_additional_residual=rest[n], return_dict=False)[0]

    return ControlledUNet(module), ["out_sample"]
