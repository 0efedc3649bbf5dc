"""ONNX -> torch.fx emitter: one GraphModule per graph, op by op, shape arithmetic kept as Python ints."""

from __future__ import annotations

import logging
import math
import operator
from typing import Any, Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from sdgraph.errors import UnsupportedError
from sdgraph.ir.model import CANONICAL_DOMAIN, Model

__all__ = ["emit", "SUPPORTED_OPS", "unsupported_nodes", "CANONICAL_NATIVE"]

log = logging.getLogger(__name__)

# canonical ops the emitter maps natively (others are inlined to standard ops first)
CANONICAL_NATIVE = frozenset({"Attention", "AttentionMasked", "GroupNorm", "GroupNormSilu", "GeGLU"})
_SMALL = 64  # int constants up to this many elements become Python values (shape arithmetic)


def _torch():
    import torch

    return torch


def _tdtype(np_dtype):
    torch = _torch()
    return {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16, np.dtype(np.float64): torch.float64,
            np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32, np.dtype(np.int8): torch.int8,
            np.dtype(np.uint8): torch.uint8, np.dtype(np.bool_): torch.bool, np.dtype(np.int16): torch.int16}[np.dtype(np_dtype)]


def _onnx_to_np(to: int):
    return onnx.helper.tensor_dtype_to_np_dtype(to)


# -- runtime helpers (fx call_function targets; plain Python so dynamo traces them) ----------
def _shape(x, start=0, end=None):
    return list(x.shape)[start:end]


def _size(x):
    return x.numel()


def _as_tensor(v, dtype):
    torch = _torch()
    if isinstance(v, torch.Tensor):
        return v.to(dtype)
    return torch.tensor(v, dtype=dtype)


def _elementwise(fn):
    def apply(a, b):
        if isinstance(a, list) and isinstance(b, list):
            if len(a) == 1 and len(b) != 1:
                a = a * len(b)
            if len(b) == 1 and len(a) != 1:
                b = b * len(a)
            return [fn(x, y) for x, y in zip(a, b)]
        if isinstance(a, list):
            return [fn(x, b) for x in a]
        if isinstance(b, list):
            return [fn(a, y) for y in b]
        return fn(a, b)

    return apply


def _idiv(a, b):
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def _imod(a, b):  # ONNX Mod with fmod=0 is Python's modulo for integers
    return a % b


_S_BIN = {
    "Add": _elementwise(operator.add), "Sub": _elementwise(operator.sub), "Mul": _elementwise(operator.mul),
    "Equal": _elementwise(operator.eq), "Less": _elementwise(operator.lt), "Greater": _elementwise(operator.gt),
    "LessOrEqual": _elementwise(operator.le), "GreaterOrEqual": _elementwise(operator.ge),
    "Max": _elementwise(max), "Min": _elementwise(min), "Mod": _elementwise(_imod),
}
_s_idiv = _elementwise(_idiv)
_s_fdiv = _elementwise(operator.truediv)


def _s_gather(data, idx):
    if isinstance(idx, list):
        return [data[i] for i in idx]
    return data[idx]


def _s_concat(*parts):
    out = []
    for p in parts:
        out.extend(p if isinstance(p, list) else [p])
    return out


def _s_unsqueeze(v):
    return [v]


def _s_squeeze(v):
    return v[0]


def _s_slice(v, start, end, step):
    n = len(v)
    start = max(start + n, 0) if start < 0 else min(start, n)
    if step > 0:
        end = max(end + n, 0) if end < 0 else min(end, n)
    else:
        end = end + n if end < 0 else min(end, n - 1)
        if end < 0:
            return v[start::step]
    return v[start:end:step]


def _s_cast(v, kind):
    f = {"int": lambda x: int(x), "float": lambda x: float(x), "bool": lambda x: bool(x)}[kind]
    return [f(x) for x in v] if isinstance(v, list) else f(v)


def _s_where(c, a, b):
    if isinstance(c, list):
        n = len(c)
        a = a if isinstance(a, list) else [a] * n
        b = b if isinstance(b, list) else [b] * n
        return [x if k else y for k, x, y in zip(c, a, b)]
    return a if c else b


def _s_neg(v):
    return [-x for x in v] if isinstance(v, list) else -v


def _s_unary(fn):
    def apply(v):
        return [fn(x) for x in v] if isinstance(v, list) else fn(v)

    return apply


def _s_prod(v, keepdims):
    p = 1
    for x in v:
        p = p * x
    return [p] if keepdims else p


def _reshape(x, shape, allowzero=0):
    shape = list(shape) if isinstance(shape, (list, tuple)) else [int(s) for s in shape.tolist()]
    if not allowzero:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _expand(x, shape):
    shape = list(shape)
    rank = max(x.dim(), len(shape))
    shape = [1] * (rank - len(shape)) + shape
    xs = [1] * (rank - x.dim()) + list(x.shape)
    target = [a if b == 1 else b for a, b in zip(xs, shape)]
    return x.reshape(xs).expand(target)


def _slice(x, starts, ends, axes, steps):
    torch = _torch()
    starts, ends = list(starts), list(ends)
    axes = list(range(len(starts))) if axes is None else list(axes)
    steps = [1] * len(starts) if steps is None else list(steps)
    idx = [slice(None)] * x.dim()
    flips = []
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = a + x.dim() if a < 0 else a
        n = x.shape[a]
        if st > 0:
            s = max(s + n, 0) if s < 0 else min(s, n)
            e = max(e + n, 0) if e < 0 else min(e, n)
            idx[a] = slice(s, e, st)
        else:  # negative step: slice the flipped axis
            s = s + n if s < 0 else min(s, n - 1)
            e = e + n if e < 0 else min(e, n)
            s = max(min(s, n - 1), -1)
            e = max(e, -1)
            if s <= e:
                idx[a] = slice(0, 0)
            else:
                flips.append(a)
                idx[a] = slice(n - 1 - s, n - 1 - e, -st)
    if flips:
        x = torch.flip(x, flips)
    return x[tuple(idx)]


def _split(x, axis, sizes, num):
    if sizes is None:
        n = x.shape[axis]
        chunk = -(-n // num)
        sizes = [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])
    return list(x.split(list(sizes), dim=axis))


def _gather(x, idx, axis):
    torch = _torch()
    if isinstance(idx, int):
        return x.select(axis, idx if idx >= 0 else idx + x.shape[axis])
    if isinstance(idx, list):
        idx = torch.tensor(idx, dtype=torch.int64, device=x.device)
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape(list(x.shape[:axis]) + list(idx.shape) + list(x.shape[axis + 1:]))


def _reduce(kind, x, axes, keepdims, noop_empty):
    torch = _torch()
    if axes is None or (isinstance(axes, list) and not axes):
        if noop_empty:
            return x
        axes = list(range(x.dim()))
    axes = [a + x.dim() if a < 0 else a for a in axes]
    if kind == "mean":
        return torch.mean(x, dim=axes, keepdim=bool(keepdims))
    if kind == "sum":
        return torch.sum(x, dim=axes, keepdim=bool(keepdims))
    if kind == "prod":
        for a in sorted(axes, reverse=True):
            x = torch.prod(x, dim=a, keepdim=True)
        return x if keepdims else x.reshape([s for i, s in enumerate(x.shape) if i not in axes])
    if kind == "sumsquare":
        return torch.sum(x * x, dim=axes, keepdim=bool(keepdims))
    fn = torch.amax if kind == "max" else torch.amin
    if x.numel() == 0:  # ONNX: the identity of max/min over an empty set
        shape = [1 if i in axes else s for i, s in enumerate(x.shape)] if keepdims else [s for i, s in enumerate(x.shape) if i not in axes]
        fill = (-math.inf if kind == "max" else math.inf) if x.is_floating_point() else (
            torch.iinfo(x.dtype).min if kind == "max" else torch.iinfo(x.dtype).max) if x.dtype != torch.bool else kind != "max"
        return torch.full(shape, fill, dtype=x.dtype)
    return fn(x, dim=axes, keepdim=bool(keepdims))


def _argmax(x, axis, keepdims, last, is_max=True):
    torch = _torch()
    if last:
        x = torch.flip(x, [axis])
    out = torch.argmax(x, dim=axis, keepdim=bool(keepdims)) if is_max else torch.argmin(x, dim=axis, keepdim=bool(keepdims))
    if last:
        out = x.shape[axis] - 1 - out
    return out


def _group_norm18(x, scale, bias, groups, eps):
    # opset 18 GroupNormalization: scale/bias are per group
    torch = _torch()
    n, c = x.shape[0], x.shape[1]
    xg = x.reshape(n, groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)
    y = (xg - mean) / torch.sqrt(var + eps)
    y = y * scale.reshape(1, groups, 1) + bias.reshape(1, groups, 1)
    return y.reshape(x.shape)


def _group_norm21(x, scale, bias, groups, eps):
    torch = _torch()
    return torch.nn.functional.group_norm(x, groups, scale, bias, eps)


def _instance_norm(x, scale, bias, eps):
    torch = _torch()
    return torch.nn.functional.instance_norm(x, weight=scale, bias=bias, eps=eps)


def _layer_norm(x, scale, bias, axis, eps):
    torch = _torch()
    axis = axis + x.dim() if axis < 0 else axis
    return torch.nn.functional.layer_norm(x, list(x.shape[axis:]), scale, bias, eps)


def _pad(x, pads, value, mode, axes):
    torch = _torch()
    rank = x.dim()
    axes = list(range(rank)) if axes is None else [a + rank if a < 0 else a for a in axes]
    n = len(axes)
    begin = dict(zip(axes, pads[:n]))
    end = dict(zip(axes, pads[n:]))
    flat = []
    for a in reversed(range(rank)):
        flat += [begin.get(a, 0), end.get(a, 0)]
    if mode == "constant":
        return torch.nn.functional.pad(x, flat, value=float(value) if value is not None else 0.0)
    return torch.nn.functional.pad(x, flat, mode={"reflect": "reflect", "edge": "replicate"}[mode])


def _resize(x, scales, sizes, mode, ctm, nearest_mode):
    torch = _torch()
    rank = x.dim()
    if sizes is not None and len(sizes):
        out = [int(s) for s in sizes][2:]
        sc = None
    else:
        sc = [float(s) for s in scales][2:]
        out = [int(math.floor(x.shape[2 + i] * sc[i])) for i in range(rank - 2)]
    if mode == "nearest":
        # asymmetric + floor is torch's "nearest"; others are refused by the check
        return torch.nn.functional.interpolate(x, size=out, mode="nearest")
    m = {3: "linear", 4: "bilinear", 5: "trilinear"}[rank]
    if sc is not None and ctm != "align_corners":  # ONNX maps coordinates with the given scale
        return torch.nn.functional.interpolate(x, scale_factor=sc, mode=m, align_corners=False, recompute_scale_factor=False)
    return torch.nn.functional.interpolate(x, size=out, mode=m, align_corners=(ctm == "align_corners"))


def _conv(x, w, b, strides, pads, dilations, group):
    torch = _torch()
    nd = x.dim() - 2
    half = pads[:nd]
    if list(half) != list(pads[nd:]):
        flat = []
        for i in reversed(range(nd)):
            flat += [pads[i], pads[nd + i]]
        x = torch.nn.functional.pad(x, flat)
        half = [0] * nd
    fn = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[nd]
    return fn(x, w, b, stride=strides, padding=half, dilation=dilations, groups=group)


def _gemm(a, b, c, alpha, beta, ta, tb):
    if ta:
        a = a.t()
    if tb:
        b = b.t()
    y = a @ b
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


def _sdpa(q, k, v, scale, num_heads, mask=None):
    """Canonical Attention: (B, S, H*D) inputs split to heads, or 4-D (B, H, S, D) as given."""
    torch = _torch()
    if q.dim() == 3 and num_heads:
        b, s, hd = q.shape
        d = hd // num_heads
        q = q.reshape(b, s, num_heads, d).transpose(1, 2)
        k = k.reshape(b, k.shape[1], num_heads, d).transpose(1, 2)
        v = v.reshape(b, v.shape[1], num_heads, -1).transpose(1, 2)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return o.transpose(1, 2).reshape(b, s, -1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _canon_group_norm(x, gamma, beta, groups, eps, silu):
    torch = _torch()
    c = x.shape[1]
    y = torch.nn.functional.group_norm(x, groups, None, None, eps)
    shape = [1, c] + [1] * (x.dim() - 2)
    y = y * gamma.reshape(shape) + beta.reshape(shape)
    return torch.nn.functional.silu(y) if silu else y


def _canon_geglu(x):
    torch = _torch()
    h, gate = x.chunk(2, dim=-1)
    return h * torch.nn.functional.gelu(gate)


def _trilu(x, k, upper):
    torch = _torch()
    return torch.triu(x, k) if upper else torch.tril(x, k)


def _cumsum(x, axis, exclusive, reverse):
    torch = _torch()
    if reverse:
        x = torch.flip(x, [axis])
    y = torch.cumsum(x, axis)
    if exclusive:
        y = y - x
    if reverse:
        y = torch.flip(y, [axis])
    return y


def _clip(x, lo, hi):
    torch = _torch()
    if lo is None and hi is None:
        return x
    return torch.clamp(x, min=lo, max=hi)


def _where(c, a, b):
    torch = _torch()
    return torch.where(c, a, b)


def _const_of_shape(shape, value, dtype):
    torch = _torch()
    return torch.full(list(shape), value, dtype=dtype)


def _range(start, limit, delta, dtype):
    torch = _torch()
    to = lambda v: v.item() if isinstance(v, torch.Tensor) else v  # noqa: E731
    return torch.arange(to(start), to(limit), to(delta), dtype=dtype)


def _tile(x, reps):
    return x.repeat(list(reps))


def _flatten(x, axis):
    axis = axis + x.dim() if axis < 0 else axis
    lead = 1
    for s in x.shape[:axis]:
        lead = lead * s
    return x.reshape(lead, -1)


def _squeeze(x, axes):
    if axes is None:
        return x.squeeze()
    axes = [a + x.dim() if a < 0 else a for a in axes]
    return x.squeeze(tuple(axes)) if axes else x


def _unsqueeze(x, axes):
    out_rank = x.dim() + len(axes)
    axes = sorted(a + out_rank if a < 0 else a for a in axes)
    for a in axes:
        x = x.unsqueeze(a)
    return x


def _div(a, b, is_int):
    torch = _torch()
    return torch.div(a, b, rounding_mode="trunc") if is_int else a / b


def _mod(a, b, fmod):
    torch = _torch()
    return torch.fmod(a, b) if fmod else torch.remainder(a, b)


def _softmax(x, axis):
    return x.softmax(axis)


def _einsum(eq, *xs):
    torch = _torch()
    return torch.einsum(eq, *xs)


def _gelu(x, approximate):
    torch = _torch()
    return torch.nn.functional.gelu(x, approximate=approximate)


# -- emitter ----------------------------------------------------------------------------------
class _Val:
    """An ONNX value during emission: a tensor (fx node) or shape arithmetic (Python value or fx node)."""

    __slots__ = ("v", "shape_like", "dtype", "lit")

    def __init__(self, v, shape_like: bool, dtype, lit=None):
        self.v, self.shape_like, self.dtype = v, shape_like, np.dtype(dtype) if dtype is not None else None
        self.lit = lit  # small constant tensors: their values, known at emission time


_UNARY = {
    "Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Exp": "exp", "Log": "log", "Sqrt": "sqrt",
    "Reciprocal": "reciprocal", "Neg": "neg", "Abs": "abs", "Erf": "erf", "Sin": "sin", "Cos": "cos",
    "Floor": "floor", "Ceil": "ceil", "Not": "logical_not", "Sign": "sign", "Round": "round",
}
_BINARY = {
    "Add": "add", "Sub": "sub", "Mul": "mul", "Pow": "pow", "Equal": "eq", "Less": "lt", "Greater": "gt",
    "LessOrEqual": "le", "GreaterOrEqual": "ge", "And": "logical_and", "Or": "logical_or", "Xor": "logical_xor",
}
_OTHER = {
    "Identity", "Dropout", "Constant", "Shape", "Size", "Cast", "CastLike", "Div", "Mod", "Max", "Min", "Sum",
    "MatMul", "Gemm", "Conv", "Reshape", "Transpose", "Concat", "Split", "Slice", "Gather", "Unsqueeze",
    "Squeeze", "Flatten", "Expand", "Tile", "ConstantOfShape", "Where", "Range", "ReduceMean", "ReduceSum",
    "ReduceMax", "ReduceMin", "ReduceProd", "ReduceSumSquare", "ArgMax", "ArgMin", "InstanceNormalization",
    "GroupNormalization", "LayerNormalization", "Resize", "Softmax", "LogSoftmax", "Einsum", "Trilu", "Clip",
    "CumSum", "Pad", "Gelu", "LeakyRelu", "Softplus", "HardSigmoid", "Elu",
}
SUPPORTED_OPS = frozenset(_UNARY) | frozenset(_BINARY) | frozenset(_OTHER)


def _attrs(node: gs.Node) -> dict[str, Any]:
    return dict(node.attrs)


def unsupported_nodes(model: Model) -> list[tuple[str, str, str]]:
    """(node, op, reason) for every node the emitter cannot take (attributes included)."""
    bad = []
    for n in model.graph.nodes:
        d = n.domain or ""
        if d == CANONICAL_DOMAIN and n.op in CANONICAL_NATIVE:
            continue
        if (d, n.op) in model.functions:
            continue
        if d not in ("", "ai.onnx"):
            bad.append((n.name, f"{d}::{n.op}", "no torch mapping for this domain"))
            continue
        if n.op not in SUPPORTED_OPS:
            bad.append((n.name, n.op, "no torch mapping in the emitter"))
            continue
        reason = _attr_problem(n, model.opset)
        if reason:
            bad.append((n.name, n.op, reason))
    return bad


def _attr_problem(n: gs.Node, opset: int) -> str:
    a = n.attrs
    for t in list(n.inputs) + list(n.outputs):
        if t.name and t.dtype is not None and _np_safe(t.dtype) is None:
            return f"dtype {t.dtype} of {t.name!r} not mapped (float32/16/64, int8-64, uint8, bool)"
    if n.op == "Dropout" and len(n.inputs) >= 3 and n.inputs[2].name:
        return "Dropout training_mode input not mapped (inference only)"
    if n.op == "Pad" and a.get("mode", "constant") != "constant":
        pads = n.inputs[1] if len(n.inputs) > 1 else None
        if not isinstance(pads, gs.Constant) or any(np.asarray(pads.values)[[0, 1, len(pads.values) // 2, len(pads.values) // 2 + 1]]):
            return "reflect/edge pad of batch or channel dims (or non-constant pads) not mapped"
    if n.op in ("Conv",) and a.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        return f"auto_pad={a.get('auto_pad')} not mapped (pads only)"
    if n.op == "Resize":
        mode = a.get("mode", "nearest")
        ctm = a.get("coordinate_transformation_mode", "half_pixel")
        if mode == "cubic":
            return "cubic resize not mapped"
        if mode == "nearest" and (ctm != "asymmetric" or a.get("nearest_mode", "round_prefer_floor") != "floor"):
            return f"nearest resize with {ctm}/{a.get('nearest_mode', 'round_prefer_floor')} not mapped (asymmetric/floor only)"
        if mode == "linear" and ctm not in ("half_pixel", "align_corners"):
            return f"linear resize with {ctm} not mapped (half_pixel, align_corners)"
        has_scales = len(n.inputs) > 2 and n.inputs[2].name and not (isinstance(n.inputs[2], gs.Constant) and n.inputs[2].values.size == 0)
        if mode == "linear" and ctm == "align_corners" and has_scales:
            return "align_corners linear resize by scales not mapped (give sizes)"
        if a.get("antialias", 0) or a.get("axes") is not None or a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
            return "resize antialias/axes/keep_aspect_ratio_policy not mapped"
        if len(n.inputs) > 1 and n.inputs[1].name and not (isinstance(n.inputs[1], gs.Constant) and n.inputs[1].values.size == 0):
            return "resize roi input not mapped"
    if n.op == "Pad" and a.get("mode", "constant") not in ("constant", "reflect", "edge"):
        return f"pad mode {a.get('mode')} not mapped"
    if n.op in ("ArgMax", "ArgMin", "Gather", "Split", "Concat", "Softmax", "LogSoftmax", "Flatten", "CumSum") and False:
        return ""
    if n.op in ("Softmax", "LogSoftmax") and opset < 13:
        return "opset < 13 softmax semantics (coerced 2-D) not mapped"
    if n.op == "Dropout" and len(n.outputs) > 1 and n.outputs[1].name:
        return "Dropout mask output not mapped"
    if n.op == "LayerNormalization" and any(o.name for o in n.outputs[1:]):
        return "LayerNormalization mean/inv_std outputs not mapped"
    if n.op == "Cast" and a.get("saturate", 1) != 1:
        return ""
    if n.op == "Cast" and _onnx_to_np_safe(a.get("to")) is None:
        return f"cast to onnx type {a.get('to')} not mapped"
    return ""


def _np_safe(dt):
    try:
        d = np.dtype(dt)
        _tdtype(d)
        return d
    except Exception:
        return None


def _onnx_to_np_safe(to):
    try:
        dt = np.dtype(_onnx_to_np(int(to)))
        _tdtype(dt)
        return dt
    except Exception:
        return None


class _Emitter:
    def __init__(self, model: Model, sdpa: bool = True):
        torch = _torch()
        import torch.fx as fx

        self.torch = torch
        self.model = model
        self.root = torch.nn.Module()
        self.g = fx.Graph()
        self.env: dict[str, _Val] = {}
        self.nconst = 0
        self.sdpa = sdpa

    # values
    def const(self, t: gs.Constant) -> _Val:
        arr = _const_array(t)
        if np.issubdtype(arr.dtype, np.integer) and arr.ndim <= 1 and arr.size <= _SMALL:
            return _Val(arr.tolist(), True, arr.dtype)
        name = f"c{self.nconst}"
        self.nconst += 1
        ten = self.torch.from_numpy(np.ascontiguousarray(arr)) if arr.dtype != np.bool_ else self.torch.from_numpy(arr.copy())
        self.root.register_buffer(name, ten, persistent=False)
        return _Val(self.g.get_attr(name), False, arr.dtype, arr.copy() if arr.size <= 16 else None)

    def val(self, t) -> _Val | None:
        if t is None or (isinstance(t, gs.Variable) and not t.name):
            return None
        if t.name in self.env:
            return self.env[t.name]
        if isinstance(t, gs.Constant):
            v = self.const(t)
            self.env[t.name] = v
            return v
        raise UnsupportedError(f"tensor {t.name!r} is used before it is produced")

    def tensor(self, v: _Val | None):
        """The value as a torch tensor (materializes shape arithmetic)."""
        if v is None:
            return None
        if not v.shape_like:
            return v.v
        return self.call(_as_tensor, v.v, _tdtype(v.dtype if v.dtype is not None else np.int64))

    def call(self, fn: Callable, *args, **kwargs):
        return self.g.call_function(fn, tuple(args), kwargs)

    def method(self, name: str, *args, **kwargs):
        return self.g.call_method(name, tuple(args), kwargs)

    def literal(self, v: _Val | None):
        """A shape value as a Python literal when known at emission time, else None."""
        if v is None or not v.shape_like:
            return None
        import torch.fx as fx

        return None if isinstance(v.v, fx.Node) or _has_node(v.v) else v.v

    def shape_arg(self, v: _Val):
        """A value used as a list of ints (shape argument): Python value / fx node of one."""
        if v.shape_like:
            return v.v
        return self.method("tolist", v.v)

    # emission
    def run(self):
        for t in self.model.graph.inputs:
            self.env[t.name] = _Val(self.g.placeholder(_ident(t.name)), False, t.dtype)
        for n in self.model.graph.nodes:
            try:
                outs = self.node(n)
            except UnsupportedError:
                raise
            except Exception as exc:
                raise UnsupportedError(f"torch emitter failed on {n.name} ({n.op}): {exc}".splitlines()[0]) from None
            for o, v in zip(n.outputs, outs):
                if o.name and v is not None:
                    self.env[o.name] = v
        results = []
        for t in self.model.graph.outputs:
            v = self.val(t)
            results.append(self.tensor(v) if v.shape_like else v.v)
        self.g.output(tuple(results))
        import torch.fx as fx

        gm = fx.GraphModule(self.root, self.g)
        gm.input_names = [t.name for t in self.model.graph.inputs]
        gm.output_names = [t.name for t in self.model.graph.outputs]
        return gm

    def node(self, n: gs.Node) -> list[_Val | None]:
        d = n.domain or ""
        ins = [self.val(t) for t in n.inputs]
        a = _attrs(n)
        out_dtype = n.outputs[0].dtype if n.outputs and n.outputs[0].dtype is not None else (ins[0].dtype if ins and ins[0] else None)
        T = lambda v: _Val(v, False, out_dtype)  # noqa: E731
        S = lambda v: _Val(v, True, out_dtype)  # noqa: E731
        op = n.op
        if d == CANONICAL_DOMAIN and op in CANONICAL_NATIVE:
            if op.startswith("Attention"):
                q, k, v = (self.tensor(x) for x in ins[:3])
                mask = self.tensor(ins[3]) if len(ins) > 3 and ins[3] is not None else None
                scale = float(a["scale"]) if a.get("scale") is not None else None
                return [T(self.call(_sdpa, q, k, v, scale, int(a.get("num_heads", 0)), mask))]
            if op.startswith("GroupNorm"):
                return [T(self.call(_canon_group_norm, *(self.tensor(x) for x in ins[:3]), int(a["groups"]),
                                    float(a.get("epsilon", 1e-5)), op == "GroupNormSilu"))]
            return [T(self.call(_canon_geglu, self.tensor(ins[0])))]
        if d not in ("", "ai.onnx"):
            raise UnsupportedError(f"{n.name}: no torch mapping for {d}::{op}")
        shape_in = [x for x in ins if x is not None]
        all_shape = bool(shape_in) and all(x.shape_like for x in shape_in)
        out_rank = len(n.outputs[0].shape) if n.outputs and n.outputs[0].shape is not None else None

        if op in ("Identity", "Dropout"):
            return [ins[0]]
        if op == "Constant":
            val = next(iter(a.values()))
            if isinstance(val, gs.Constant):
                return [self.const(val)]
            arr = np.asarray(val)
            if isinstance(val, (int, float, list)):
                return [S(val)] if np.issubdtype(arr.dtype, np.integer) else [T(self.call(self.torch.tensor, val))]
            return [self.const(gs.Constant(n.outputs[0].name + "_v", arr))]
        if op == "Shape":
            return [_Val(self.call(_shape, ins[0].v if not ins[0].shape_like else self.tensor(ins[0]), a.get("start", 0), a.get("end")), True, np.int64)]
        if op == "Size":
            return [_Val(self.call(_size, self.tensor(ins[0])), True, np.int64)]
        if op == "Cast" or op == "CastLike":
            to = np.dtype(_onnx_to_np(a["to"])) if op == "Cast" else ins[1].dtype
            if ins[0].shape_like:
                kind = "bool" if to == np.bool_ else "int" if np.issubdtype(to, np.integer) else "float"
                return [_Val(self.call(_s_cast, ins[0].v, kind), True, to)]
            return [_Val(self.method("to", ins[0].v, _tdtype(to)), False, to)]

        # shape arithmetic stays in Python when every input is shape-like and the result is 0-/1-D
        if all_shape and (out_rank is None or out_rank <= 1):
            r = self.shape_op(n, op, ins, a, out_dtype)
            if r is not None:
                return r

        if op in _UNARY:
            return [T(self.call(getattr(self.torch, _UNARY[op]), self.tensor(ins[0])))]
        if op in _BINARY:
            return [T(self.call(getattr(self.torch, _BINARY[op]), self.tensor(ins[0]), self.tensor(ins[1])))]
        if op == "Div":
            is_int = out_dtype is not None and np.issubdtype(np.dtype(out_dtype), np.integer)
            return [T(self.call(_div, self.tensor(ins[0]), self.tensor(ins[1]), is_int))]
        if op == "Mod":
            return [T(self.call(_mod, self.tensor(ins[0]), self.tensor(ins[1]), int(a.get("fmod", 0))))]
        if op in ("Max", "Min", "Sum"):
            fn = {"Max": self.torch.maximum, "Min": self.torch.minimum, "Sum": self.torch.add}[op]
            acc = self.tensor(ins[0])
            for x in ins[1:]:
                acc = self.call(fn, acc, self.tensor(x))
            return [T(acc)]
        if op == "MatMul":
            return [T(self.call(self.torch.matmul, self.tensor(ins[0]), self.tensor(ins[1])))]
        if op == "Gemm":
            c = self.tensor(ins[2]) if len(ins) > 2 else None
            return [T(self.call(_gemm, self.tensor(ins[0]), self.tensor(ins[1]), c, float(a.get("alpha", 1.0)),
                                float(a.get("beta", 1.0)), int(a.get("transA", 0)), int(a.get("transB", 0))))]
        if op == "Conv":
            w = ins[1]
            nd = len(n.inputs[1].shape) - 2 if n.inputs[1].shape is not None else 2
            pads = list(a.get("pads", [0] * 2 * nd))
            b = self.tensor(ins[2]) if len(ins) > 2 else None
            return [T(self.call(_conv, self.tensor(ins[0]), self.tensor(w), b, list(a.get("strides", [1] * nd)), pads,
                                list(a.get("dilations", [1] * nd)), int(a.get("group", 1))))]
        if op == "Reshape":
            return [T(self.call(_reshape, self.tensor(ins[0]), self.shape_arg(ins[1]), int(a.get("allowzero", 0))))]
        if op == "Transpose":
            x = self.tensor(ins[0])
            perm = a.get("perm")
            if perm is None:
                return [T(self.method("permute", x, *reversed(range(out_rank or 0))))] if out_rank else [T(self.method("t", x))]
            return [T(self.method("permute", x, list(perm)))]
        if op == "Concat":
            return [T(self.call(self.torch.cat, [self.tensor(x) for x in ins], int(a["axis"])))]
        if op == "Split":
            sizes = self.shape_arg(ins[1]) if len(ins) > 1 and ins[1] is not None else a.get("split")
            num = int(a.get("num_outputs", len(n.outputs)))
            parts = self.call(_split, self.tensor(ins[0]), _norm_axis(a.get("axis", 0), n), list(sizes) if isinstance(sizes, (list, tuple)) else sizes, num)
            return [T(self.call(operator.getitem, parts, i)) for i in range(len(n.outputs))]
        if op == "Slice":
            starts, ends = self.shape_arg(ins[1]), self.shape_arg(ins[2])
            axes = self.shape_arg(ins[3]) if len(ins) > 3 and ins[3] is not None else None
            steps = self.shape_arg(ins[4]) if len(ins) > 4 and ins[4] is not None else None
            return [T(self.call(_slice, self.tensor(ins[0]), starts, ends, axes, steps))]
        if op == "Gather":
            axis = int(a.get("axis", 0))
            idx = ins[1].v if ins[1].shape_like else ins[1].v
            if not ins[1].shape_like:
                idx = self.tensor(ins[1])
            return [T(self.call(_gather, self.tensor(ins[0]), idx, axis))]
        if op == "Unsqueeze":
            axes = self.shape_arg(ins[1]) if len(ins) > 1 else list(a["axes"])
            return [T(self.call(_unsqueeze, self.tensor(ins[0]), axes))]
        if op == "Squeeze":
            axes = self.shape_arg(ins[1]) if len(ins) > 1 and ins[1] is not None else a.get("axes")
            return [T(self.call(_squeeze, self.tensor(ins[0]), list(axes) if isinstance(axes, (list, tuple)) else axes))]
        if op == "Flatten":
            return [T(self.call(_flatten, self.tensor(ins[0]), int(a.get("axis", 1))))]
        if op == "Expand":
            return [T(self.call(_expand, self.tensor(ins[0]), self.shape_arg(ins[1])))]
        if op == "Tile":
            return [T(self.call(_tile, self.tensor(ins[0]), self.shape_arg(ins[1])))]
        if op == "ConstantOfShape":
            val = a.get("value")
            arr = np.asarray(val.values if isinstance(val, gs.Constant) else (val if val is not None else np.zeros(1, np.float32)))
            dt = arr.dtype
            return [_Val(self.call(_const_of_shape, self.shape_arg(ins[0]), arr.reshape(-1)[0].item(), _tdtype(dt)), False, dt)]
        if op == "Where":
            return [T(self.call(_where, self.tensor(ins[0]), self.tensor(ins[1]), self.tensor(ins[2])))]
        if op == "Range":
            args = [x.v if x.shape_like else self.tensor(x) for x in ins]
            return [T(self.call(_range, *args, _tdtype(out_dtype)))]
        if op.startswith("Reduce"):
            kind = {"ReduceMean": "mean", "ReduceSum": "sum", "ReduceMax": "max", "ReduceMin": "min",
                    "ReduceProd": "prod", "ReduceSumSquare": "sumsquare"}[op]
            axes = self.shape_arg(ins[1]) if len(ins) > 1 and ins[1] is not None else a.get("axes")
            axes = list(axes) if isinstance(axes, (list, tuple)) else axes
            return [T(self.call(_reduce, kind, self.tensor(ins[0]), axes, int(a.get("keepdims", 1)), int(a.get("noop_with_empty_axes", 0))))]
        if op in ("ArgMax", "ArgMin"):
            return [T(self.call(_argmax, self.tensor(ins[0]), int(a.get("axis", 0)), int(a.get("keepdims", 1)),
                                int(a.get("select_last_index", 0)), op == "ArgMax"))]
        if op == "InstanceNormalization":
            return [T(self.call(_instance_norm, *(self.tensor(x) for x in ins[:3]), float(a.get("epsilon", 1e-5))))]
        if op == "GroupNormalization":
            fn = _group_norm21 if self.model.opset >= 21 else _group_norm18
            return [T(self.call(fn, *(self.tensor(x) for x in ins[:3]), int(a["num_groups"]), float(a.get("epsilon", 1e-5))))]
        if op == "LayerNormalization":
            b = self.tensor(ins[2]) if len(ins) > 2 else None
            return [T(self.call(_layer_norm, self.tensor(ins[0]), self.tensor(ins[1]), b, int(a.get("axis", -1)), float(a.get("epsilon", 1e-5))))]
        if op == "Resize":
            scales = None
            if len(ins) > 2 and ins[2] is not None:
                if ins[2].lit is not None:  # constant scales as Python floats: no graph break
                    scales = [float(v) for v in ins[2].lit.reshape(-1)]
                elif ins[2].shape_like:
                    scales = ins[2].v
                else:
                    scales = self.method("tolist", ins[2].v)
            sizes = self.shape_arg(ins[3]) if len(ins) > 3 and ins[3] is not None else None
            return [T(self.call(_resize, self.tensor(ins[0]), scales, sizes, a.get("mode", "nearest"),
                                a.get("coordinate_transformation_mode", "half_pixel"), a.get("nearest_mode", "round_prefer_floor")))]
        if op == "Softmax":
            return [T(self.call(_softmax, self.tensor(ins[0]), int(a.get("axis", -1))))]
        if op == "LogSoftmax":
            return [T(self.call(self.torch.log_softmax, self.tensor(ins[0]), int(a.get("axis", -1))))]
        if op == "Einsum":
            return [T(self.call(_einsum, a["equation"], *(self.tensor(x) for x in ins)))]
        if op == "Trilu":
            k = ins[1].v if len(ins) > 1 and ins[1] is not None else 0
            if len(ins) > 1 and ins[1] is not None and not ins[1].shape_like:
                k = self.method("item", ins[1].v)
            return [T(self.call(_trilu, self.tensor(ins[0]), k, int(a.get("upper", 1))))]
        if op == "Clip":
            lo = self.tensor(ins[1]) if len(ins) > 1 and ins[1] is not None else a.get("min")
            hi = self.tensor(ins[2]) if len(ins) > 2 and ins[2] is not None else a.get("max")
            return [T(self.call(_clip, self.tensor(ins[0]), lo, hi))]
        if op == "CumSum":
            axis = ins[1].v if ins[1].shape_like else self.method("item", ins[1].v)
            if isinstance(axis, list):
                axis = axis[0]
            return [T(self.call(_cumsum, self.tensor(ins[0]), axis, int(a.get("exclusive", 0)), int(a.get("reverse", 0))))]
        if op == "Pad":
            pads = self.shape_arg(ins[1]) if len(ins) > 1 else list(a["pads"])
            value = self.method("item", self.tensor(ins[2])) if len(ins) > 2 and ins[2] is not None else a.get("value", 0.0)
            axes = self.shape_arg(ins[3]) if len(ins) > 3 and ins[3] is not None else None
            return [T(self.call(_pad, self.tensor(ins[0]), pads, value, a.get("mode", "constant"), axes))]
        if op == "Gelu":
            return [T(self.call(_gelu, self.tensor(ins[0]), a.get("approximate", "none")))]
        if op == "LeakyRelu":
            return [T(self.call(self.torch.nn.functional.leaky_relu, self.tensor(ins[0]), float(a.get("alpha", 0.01))))]
        if op == "Elu":
            return [T(self.call(self.torch.nn.functional.elu, self.tensor(ins[0]), float(a.get("alpha", 1.0))))]
        if op == "Softplus":
            return [T(self.call(self.torch.nn.functional.softplus, self.tensor(ins[0])))]
        if op == "HardSigmoid":
            x = self.tensor(ins[0])
            y = self.call(operator.add, self.call(operator.mul, x, float(a.get("alpha", 0.2))), float(a.get("beta", 0.5)))
            return [T(self.call(self.torch.clamp, y, 0.0, 1.0))]
        raise UnsupportedError(f"{n.name}: no torch mapping for {op}")

    def shape_op(self, n, op, ins, a, out_dtype):
        S = lambda v: _Val(v, True, out_dtype)  # noqa: E731
        c = self.call
        is_int = out_dtype is not None and np.issubdtype(np.dtype(out_dtype), np.integer)
        if op in _S_BIN and op not in ("Max", "Min") or op in ("Max", "Min") and len(ins) == 2:
            return [S(c(_S_BIN[op], ins[0].v, ins[1].v))]
        if op == "Div":
            return [S(c(_s_idiv if is_int else _s_fdiv, ins[0].v, ins[1].v))]
        if op == "Neg":
            return [S(c(_s_neg, ins[0].v))]
        if op in ("Floor", "Ceil", "Sqrt"):
            return [S(c(_s_unary({"Floor": math.floor, "Ceil": math.ceil, "Sqrt": math.sqrt}[op]), ins[0].v))]
        if op == "Gather" and int(a.get("axis", 0)) == 0:
            return [S(c(_s_gather, ins[0].v, ins[1].v))]
        if op == "Concat":
            return [S(c(_s_concat, *[x.v for x in ins]))]
        if op == "Unsqueeze":
            return [S(c(_s_unsqueeze, ins[0].v))]
        if op == "Squeeze":
            return [S(c(_s_squeeze, ins[0].v))]
        if op == "Slice" and len(ins) >= 3:
            st, en = self.literal(ins[1]), self.literal(ins[2])
            step = self.literal(ins[4]) if len(ins) > 4 and ins[4] is not None else [1]
            if st is not None and en is not None and step is not None and len(st) == 1:
                return [S(c(_s_slice, ins[0].v, st[0], en[0], step[0]))]
            return None
        if op == "Where":
            return [S(c(_s_where, ins[0].v, ins[1].v, ins[2].v))]
        if op == "ReduceProd" and (len(ins) == 1 or ins[1] is None):
            return [S(c(_s_prod, ins[0].v, int(a.get("keepdims", 1))))]
        if op == "Reshape":
            return [ins[0]]  # a 0/1-D shape value reshaped to 0/1-D: only [x] <-> x matters
        return None


def _const_array(t: gs.Constant) -> np.ndarray:
    """The constant's values without pinning them in the graph (``.values`` would replace lazy weights)."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    v = t._values
    return v.load() if isinstance(v, LazyValues) else np.asarray(v)


def _has_node(v) -> bool:
    import torch.fx as fx

    if isinstance(v, fx.Node):
        return True
    if isinstance(v, (list, tuple)):
        return any(_has_node(x) for x in v)
    return False


def _ident(name: str) -> str:
    out = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in name)
    return out if out and not out[0].isdigit() else "i_" + out


def _norm_axis(axis: int, n: gs.Node) -> int:
    if axis < 0 and n.inputs[0].shape is not None:
        return axis + len(n.inputs[0].shape)
    return axis


def emit(model: Model, sdpa: bool = True):
    """A ``torch.fx.GraphModule`` computing ``model``: positional inputs in graph-input order, a tuple out.

    Canonical ``ai.sdgraph`` Attention maps to ``scaled_dot_product_attention``; other canonical ops
    must have been inlined. Raises UnsupportedError listing every node it cannot take.
    """
    bad = unsupported_nodes(model)
    if bad:
        raise UnsupportedError(f"{len(bad)} node(s) have no torch mapping", [f"{a} ({b}): {c}" for a, b, c in bad])
    return _Emitter(model, sdpa).run()
