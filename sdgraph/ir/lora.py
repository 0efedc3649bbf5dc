"""LoRA weights: read safetensors files (diffusers/peft and kohya), find each LoRA module's weight in a graph,
compute the folded deltas ``scale * alpha/rank * up @ down``.

Used by the ``lora`` pass (fold into a model's initializers) and by ``sdgraph refit`` (lowered artifacts).

Finding a module's weight in a graph, in order:

1. ``map``: the ``sdgraph.params`` metadata export writes into every submodel (torch parameter ->
   initializer name and whether the initializer is transposed), matched by content at export time;
2. ``name``: the initializer is named after the parameter (dynamo, Conv and Gemm weights), or its
   reader node is named after the module (the legacy exporter's ``/model/<path>/MatMul`` scopes);
3. ``position``: the unmatched LoRA modules of one weight shape against the unclaimed graph weights
   of that shape, in module order against order of appearance, only when the counts agree.

Anything left is reported as unmatched (``strict`` makes that an error).
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from sdgraph.errors import InputError, VerificationError

__all__ = ["PARAMS_KEY", "LoraModule", "LoraFile", "read_safetensors", "load_lora", "WeightRef", "match_weights",
           "Matching", "COMPONENTS", "check_matching", "folded"]

PARAMS_KEY = "sdgraph.params"  # model metadata: {"version": 1, "params": {param: [initializer, transposed]}}
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": "bf16", "I64": np.int64, "I32": np.int32,
           "I8": np.int8, "U8": np.uint8}
_MAX_HEADER = 100 << 20


# -- safetensors --------------------------------------------------------------------------------
def read_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor of a safetensors file (as float32/int numpy arrays) and its ``__metadata__``."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the LoRA file ({exc.strerror or exc})") from None

    def bad(why: str) -> InputError:
        return InputError(f"{path}: not a valid safetensors file ({why})")

    if len(data) < 8:
        raise bad("shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER or 8 + n > len(data):
        raise bad(f"header length {n} runs past the end of the {len(data)}-byte file")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except ValueError as exc:
        raise bad(f"header is not JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + n:]
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        try:
            dtype, shape, (a, b) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r} has no dtype/shape/data_offsets") from None
        if dtype not in _DTYPES:
            raise bad(f"tensor {name!r} has dtype {dtype}, not a float or int type")
        item = 2 if _DTYPES[dtype] == "bf16" else np.dtype(_DTYPES[dtype]).itemsize
        if not (0 <= a <= b <= len(body)) or b - a != item * int(np.prod(shape, dtype=np.int64)) or min(shape, default=1) < 0:
            raise bad(f"tensor {name!r}: data_offsets [{a}, {b}] do not fit shape {shape} {dtype} in the file")
        raw = body[a:b]
        if _DTYPES[dtype] == "bf16":
            arr = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, _DTYPES[dtype])
        tensors[name] = arr.reshape(shape)
    return tensors, {str(k): str(v) for k, v in dict(meta).items()}


# -- LoRA files ---------------------------------------------------------------------------------
@dataclasses.dataclass
class LoraModule:
    """One LoRA'd layer: ``delta = scale * alpha/rank * up @ down`` (reshaped for convs)."""

    component: str  # unet, text_encoder, text_encoder_2
    module: str  # diffusers module path, or a kohya name (``_`` for ``.``) resolved against the graph
    down: np.ndarray  # [rank, in] or [rank, in, kh, kw]
    up: np.ndarray  # [out, rank] or [out, rank, 1, 1]
    alpha: float | None = None  # None: alpha == rank (diffusers' default: scale 1)
    kohya: bool = False

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (int(self.up.shape[0]), *map(int, self.down.shape[1:]))

    def delta(self, scale: float, rslora: bool = False) -> np.ndarray:
        r = self.rank
        factor = scale * ((self.alpha if self.alpha is not None else r) / (r ** 0.5 if rslora else r))
        up = self.up.astype(np.float32).reshape(self.up.shape[0], -1)
        down = self.down.astype(np.float32).reshape(r, -1)
        return ((up @ down) * np.float32(factor)).reshape(self.weight_shape)


@dataclasses.dataclass
class LoraFile:
    path: Path
    modules: list[LoraModule]
    rslora: dict[str, bool]
    format: str  # diffusers | kohya

    def for_component(self, component: str) -> list[LoraModule]:
        return [m for m in self.modules if m.component == component]


_KOHYA_PREFIX = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
# older diffusers spellings of attention processors' LoRA layers -> the module they wrap
_OLD_UNET = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
_OLD_TEXT = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}
_DIFFUSERS_PAIR = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"),
                   (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"), (".down.weight", ".up.weight"))


def load_lora(path: str | Path) -> LoraFile:
    """Read a LoRA file in the diffusers/peft or the kohya layout; bad or foreign files are InputErrors."""
    path = Path(path)
    tensors, meta = read_safetensors(path)
    if not tensors:
        raise InputError(f"{path}: the safetensors file holds no tensors")
    kohya = any(k.startswith(tuple(_KOHYA_PREFIX)) for k in tensors)
    modules = _kohya(path, tensors) if kohya else _diffusers(path, tensors, meta)
    if not modules:
        raise InputError(f"{path}: no LoRA weights found (expected diffusers '<component>.<module>.lora_A/lora_B.weight' "
                         "or kohya 'lora_unet_<module>.lora_down/lora_up.weight' keys)")
    rslora = {}
    adapter = _adapter_metadata(path, meta)
    for comp in COMPONENTS:
        rslora[comp] = bool(adapter.get(f"{comp}.use_rslora", False))
    for m in modules:
        if m.down.ndim not in (2, 4) or m.up.ndim != m.down.ndim or m.up.shape[1] != m.down.shape[0] \
                or (m.up.ndim == 4 and tuple(m.up.shape[2:]) != (1, 1)):
            raise InputError(f"{path}: rank mismatch in {m.component}.{m.module}: down {list(m.down.shape)} "
                             f"and up {list(m.up.shape)} do not multiply (rank = down's first dim = up's second)")
    return LoraFile(path, modules, rslora, "kohya" if kohya else "diffusers")


def _adapter_metadata(path: Path, meta: dict[str, str]) -> dict[str, Any]:
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        out = json.loads(raw)
    except ValueError:
        raise InputError(f"{path}: lora_adapter_metadata is not JSON") from None
    return out if isinstance(out, dict) else {}


def _kohya(path: Path, tensors: dict[str, np.ndarray]) -> list[LoraModule]:
    out = []
    for key in tensors:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        prefix = next((p for p in _KOHYA_PREFIX if name.startswith(p)), None)
        if prefix is None:
            continue
        up = tensors.get(f"{name}.lora_up.weight")
        if up is None:
            raise InputError(f"{path}: {key} has no matching {name}.lora_up.weight")
        alpha = tensors.get(f"{name}.alpha")
        out.append(LoraModule(_KOHYA_PREFIX[prefix], name[len(prefix):], tensors[key], up,
                              float(np.asarray(alpha).reshape(-1)[0]) if alpha is not None else None, kohya=True))
    return out


def _diffusers(path: Path, tensors: dict[str, np.ndarray], meta: dict[str, str]) -> list[LoraModule]:
    adapter = _adapter_metadata(path, meta)
    out = []
    for key in tensors:
        pair = next((p for p in _DIFFUSERS_PAIR if key.endswith(p[0])), None)
        if pair is None:
            continue
        base = key[: -len(pair[0])]
        up = tensors.get(base + pair[1])
        if up is None:
            raise InputError(f"{path}: {key} has no matching {base + pair[1]}")
        comp, _, module = base.partition(".")
        if comp not in COMPONENTS:
            continue
        module = module.replace(".processor.", ".")
        leaf = module.rsplit(".", 1)[-1]
        table = _OLD_UNET if comp == "unet" else _OLD_TEXT
        if leaf in table:
            module = module[: -len(leaf)] + table[leaf]
        alpha = tensors.get(f"{base}.alpha")
        if alpha is not None:
            a = float(np.asarray(alpha).reshape(-1)[0])
        else:
            a = _pattern(adapter.get(f"{comp}.alpha_pattern"), module, adapter.get(f"{comp}.lora_alpha"))
        out.append(LoraModule(comp, module, tensors[key], up, a))
    return out


def _pattern(patterns: Any, module: str, default: Any) -> float | None:
    """peft's alpha_pattern: the longest key that ends the module path wins; else the adapter's lora_alpha."""
    if isinstance(patterns, dict):
        hits = [k for k in patterns if module == k or module.endswith("." + k) or re.fullmatch(k, module or "")]
        if hits:
            return float(patterns[max(hits, key=len)])
    return float(default) if default is not None else None


# -- finding weights in a graph -----------------------------------------------------------------
@dataclasses.dataclass
class WeightRef:
    """Where a module's weight lives: the Constant, whether it is stored transposed, how it was found, and
    for an INT8 (QDQ) graph the DequantizeLinear that reads it (the Constant then holds the int8 values)."""

    tensor: gs.Constant
    transposed: bool
    how: str  # map | name | position
    dq: gs.Node | None = None

    def tensors(self) -> list[gs.Constant]:
        """The initializers a refit of this weight may change (an INT8 weight's scale too)."""
        return [self.tensor] + ([self.dq.inputs[1]] if self.dq is not None else [])

    def as_float(self, values: dict[str, np.ndarray]) -> np.ndarray:
        """The weight in float32 from the initializers' ``values`` (dequantized for INT8)."""
        w = values[self.tensor.name]
        if self.dq is None:
            return w.astype(np.float32)
        scale, zp, axis = self._qparams(values, w)
        return ((w.astype(np.float32) - zp) * scale).astype(np.float32)

    def materialize(self, value: np.ndarray, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """New initializer values for the float weight ``value``: as is (in the graph's dtype), or for INT8
        requantized with the base scales, widened per channel only where the new weight needs more range
        (activation scales are untouched: they keep the calibration)."""
        base = values[self.tensor.name]
        if self.dq is None:
            return {self.tensor.name: value.astype(base.dtype)}
        scale, zp, axis = self._qparams(values, base)
        info = np.iinfo(base.dtype)
        used = float(np.abs(base.astype(np.int32) - zp).max()) or float(info.max)
        reduce = tuple(i for i in range(base.ndim) if i != axis) if np.ndim(values[self.dq.inputs[1].name]) else None
        need = np.abs(value).max(axis=reduce, keepdims=True) / used if reduce is not None else np.abs(value).max() / used
        new_scale = np.maximum(scale, need).astype(np.float32)
        q = np.clip(np.rint(value / new_scale) + zp, info.min, info.max).astype(base.dtype)
        s_name = self.dq.inputs[1].name
        return {self.tensor.name: q, s_name: new_scale.reshape(np.shape(values[s_name])).astype(values[s_name].dtype)}

    def _qparams(self, values: dict[str, np.ndarray], w: np.ndarray):
        s = values[self.dq.inputs[1].name].astype(np.float32)
        zp_t = self.dq.inputs[2] if len(self.dq.inputs) > 2 else None
        zp = np.asarray(zp_t.values, np.float32) if isinstance(zp_t, gs.Constant) else np.zeros_like(s)
        axis = int(self.dq.attrs.get("axis", 1)) % w.ndim
        if s.ndim:
            shape = [1] * w.ndim
            shape[axis] = -1
            s, zp = s.reshape(shape), zp.reshape(shape)
        return s, zp, axis


@dataclasses.dataclass
class Matching:
    matched: dict[str, WeightRef]  # LoRA module -> weight
    unmatched: dict[str, str]  # LoRA module -> reason

    def counts(self) -> dict[str, int]:
        c: dict[str, int] = {}
        for ref in self.matched.values():
            c[ref.how] = c.get(ref.how, 0) + 1
        return c


_WEIGHT_OPS = {"MatMul": 1, "Gemm": 1, "Conv": 1}
_LEAF_ORDER = ("conv1", "time_emb_proj", "conv2", "conv_shortcut", "proj_in", "attn1", "attn2", "to_q", "q_proj",
               "to_k", "k_proj", "to_v", "v_proj", "to_out", "out_proj", "ff", "fc1", "fc2", "proj_out", "conv")


def _candidates(graph: gs.Graph) -> list[tuple[gs.Constant, gs.Node, bool, gs.Node | None]]:
    """Weights of MatMul/Gemm/Conv (input 1): float Constants, or int8 ones behind a DequantizeLinear (QDQ),
    with the reader, whether the weight is [in, out], and the DequantizeLinear."""
    out, seen = [], set()
    for node in graph.nodes:
        if node.op not in _WEIGHT_OPS or len(node.inputs) < 2:
            continue
        w, dq = node.inputs[1], None
        if not isinstance(w, gs.Constant) and len(w.inputs) == 1 and w.inputs[0].op == "DequantizeLinear":
            dq = w.inputs[0]
            w = dq.inputs[0]
            if not isinstance(dq.inputs[1], gs.Constant):
                continue
        if not isinstance(w, gs.Constant) or len(w.shape or ()) not in (2, 4) or id(w) in seen:
            continue
        kind = np.dtype(w.dtype).kind
        if (dq is None and kind != "f") or (dq is not None and kind not in "iu"):
            continue
        seen.add(id(w))
        transposed = node.op == "MatMul" or (node.op == "Gemm" and not node.attrs.get("transB", 0))
        out.append((w, node, transposed, dq))
    return out


def _scope(node_name: str) -> str | None:
    """``/model/down_blocks.0/attn1/to_q/MatMul`` -> ``down_blocks.0.attn1.to_q`` (the legacy exporter's scopes)."""
    parts = [p for p in node_name.split("/") if p]
    if len(parts) < 2:
        return None
    if parts[0] == "model":
        parts = parts[1:]
    return ".".join(parts[:-1]) or None


def _param_module(param: str) -> str:
    p = param[len("model."):] if param.startswith("model.") else param
    return p[: -len(".weight")] if p.endswith(".weight") else p


def _order_key(module: str) -> list:
    key = []
    for part in re.split(r"[._]", module):
        if part.isdigit():
            key.append((1, int(part), ""))
        elif part in _LEAF_ORDER:
            key.append((0, _LEAF_ORDER.index(part), part))
        else:
            key.append((2, {"down": 0, "mid": 1, "up": 2}.get(part, 3), part))
    return key


def match_weights(graph: gs.Graph, metadata: dict[str, str], modules: list[LoraModule]) -> Matching:
    """Find the weight of every LoRA module in ``graph`` (see the module docstring for the order)."""
    cands = _candidates(graph)
    by_name = {w.name: (w, t, dq) for w, _, t, dq in cands}
    by_name.update({w.name[: -len("_quantized")]: (w, t, dq) for w, _, t, dq in cands if w.name.endswith("_quantized")})
    dqs = {id(w): dq for w, _, _, dq in cands}
    known: dict[str, tuple[gs.Constant, bool, str]] = {}  # module path -> weight
    try:
        pmap = json.loads(metadata.get(PARAMS_KEY, "{}")).get("params", {})
    except (ValueError, AttributeError):
        pmap = {}
    for param, (init, transposed) in pmap.items():
        if init in by_name:
            known[_param_module(param)] = (by_name[init][0], bool(transposed), "map")
    for w, node, transposed, _ in cands:
        wname = w.name.removesuffix("_quantized")
        for mod in (_param_module(wname) if wname.endswith(".weight") else None, _scope(node.name or "")):
            if mod and mod not in known:
                known[mod] = (w, transposed, "name")
    kohya_names = {m.replace(".", "_"): m for m in known}
    matched: dict[str, WeightRef] = {}
    unmatched: dict[str, str] = {}
    claimed = set()
    for lm in modules:
        mod = kohya_names.get(lm.module) if lm.kohya else lm.module
        if lm.kohya and mod is None:  # transformers before v5 nest CLIP under text_model
            mod = kohya_names.get(lm.module.removeprefix("text_model_")) or kohya_names.get("text_model_" + lm.module)
        elif mod not in known:
            mod = next((m for m in (mod.removeprefix("text_model."), "text_model." + mod) if m in known), mod)
        hit = known.get(mod) if mod else None
        if hit is None:
            continue
        w, transposed, how = hit
        shape = tuple(w.shape[::-1]) if transposed and len(w.shape) == 2 else tuple(w.shape)
        if shape != lm.weight_shape:
            raise InputError(f"LoRA {lm.component}.{lm.module} has weight shape {list(lm.weight_shape)}, the graph's "
                             f"{w.name} is {list(shape)}: a LoRA for another architecture or model size")
        lm.module = mod
        matched[lm.module] = WeightRef(w, transposed, how, dqs.get(id(w)))
        claimed.add(id(w))
    # position: per weight shape, LoRA modules in module order against graph weights in order of appearance
    rest = [lm for lm in modules if lm.module not in matched]
    groups: dict[tuple, list[LoraModule]] = {}
    for lm in rest:
        groups.setdefault(lm.weight_shape, []).append(lm)
    for shape, lms in groups.items():
        free = [(w, t) for w, _, t, _ in cands if id(w) not in claimed
                and (tuple(w.shape[::-1]) if t and len(w.shape) == 2 else tuple(w.shape)) == shape]
        if len(free) != len(lms):
            for lm in lms:
                unmatched[lm.module] = (f"no weight named after it; {len(free)} unclaimed graph weight(s) of shape "
                                        f"{list(shape)} for {len(lms)} LoRA module(s): position is ambiguous")
            continue
        for lm, (w, t) in zip(sorted(lms, key=lambda m: _order_key(m.module)), free):
            matched[lm.module] = WeightRef(w, t, "position", dqs.get(id(w)))
            claimed.add(id(w))
    return Matching(matched, unmatched)


def check_matching(where: str, lora: LoraFile, component: str, matching: Matching, strict: bool) -> None:
    """No match at all is bad input (another architecture); any unmatched with ``strict`` fails verification."""
    if matching.unmatched and not matching.matched:
        raise InputError(f"{lora.path}: none of its {len(matching.unmatched)} {component} LoRA module(s) matches a "
                         f"weight of {where}: a LoRA for another architecture?")
    if strict and matching.unmatched:
        first, why = next(iter(matching.unmatched.items()))
        raise VerificationError(f"{lora.path}: {len(matching.unmatched)} {component} LoRA module(s) unmatched in {where} "
                                f"(strict), first {first}: {why}")


def folded(base: np.ndarray, delta: np.ndarray, transposed: bool) -> np.ndarray:
    """``base + delta`` in the graph's layout and dtype (the sum in float32, as diffusers' fuse_lora)."""
    d = delta.T if transposed and delta.ndim == 2 else delta
    return (base.astype(np.float32) + d).astype(base.dtype)
