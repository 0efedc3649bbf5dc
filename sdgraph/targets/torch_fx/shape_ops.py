"""Shape, layout and indexing ops: Constant, Shape/Size, Reshape, Transpose, Concat, Split, Slice, Gather,
(Un)Squeeze, Flatten, Expand, Tile, ConstantOfShape, Range, Trilu.

Shape arithmetic (Shape -> Gather -> Concat -> Reshape chains) stays in Python ints through the
``shape`` paths, so torch.compile sees symbolic sizes instead of tensors.
"""

from __future__ import annotations

import operator

import numpy as np
import onnx_graphsurgeon as gs

from sdgraph.targets.torch_fx import shape_math as sm
from sdgraph.targets.torch_fx._values import Val, tdtype, torch_mod
from sdgraph.targets.torch_fx.registry import converter

__all__: list[str] = []


# -- runtime helpers (fx call targets) ----------------------------------------------------------
def _shape(x, start=0, end=None):
    return list(x.shape)[start:end]


def _size(x):
    return x.numel()


def _reshape(x, shape, allowzero=0):
    shape = list(shape) if isinstance(shape, (list, tuple)) else [int(s) for s in shape.tolist()]
    if not allowzero:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _transpose(x, perm):
    return x.permute(list(perm) if perm is not None else list(reversed(range(x.dim()))))


def _expand(x, shape):
    shape = list(shape)
    rank = max(x.dim(), len(shape))
    shape = [1] * (rank - len(shape)) + shape
    xs = [1] * (rank - x.dim()) + list(x.shape)
    target = [a if b == 1 else b for a, b in zip(xs, shape)]
    return x.reshape(xs).expand(target)


def _slice(x, starts, ends, axes, steps):
    torch = torch_mod()
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
    torch = torch_mod()
    if isinstance(idx, int):
        return x.select(axis, idx if idx >= 0 else idx + x.shape[axis])
    if isinstance(idx, list):
        idx = torch.tensor(idx, dtype=torch.int64, device=x.device)
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape(list(x.shape[:axis]) + list(idx.shape) + list(x.shape[axis + 1:]))


def _squeeze(x, axes):
    if axes is None:
        return x.squeeze()
    axes = [a + x.dim() if a < 0 else a for a in axes]
    return x.squeeze(tuple(axes)) if axes else x


def _unsqueeze(x, axes):
    out_rank = x.dim() + len(axes)
    for a in sorted(a + out_rank if a < 0 else a for a in axes):
        x = x.unsqueeze(a)
    return x


def _flatten(x, axis):
    axis = axis + x.dim() if axis < 0 else axis
    lead = 1
    for s in x.shape[:axis]:
        lead = lead * s
    return x.reshape(lead, -1)


def _tile(x, reps):
    return x.repeat(list(reps))


def _const_of_shape(shape, value, dtype):
    return torch_mod().full(list(shape), value, dtype=dtype)


def _range(start, limit, delta, dtype):
    torch = torch_mod()

    def to(v):
        return v.item() if isinstance(v, torch.Tensor) else v

    return torch.arange(to(start), to(limit), to(delta), dtype=dtype)


def _trilu(x, k, upper):
    torch = torch_mod()
    return torch.triu(x, k) if upper else torch.tril(x, k)


def _axis(axis: int, n: gs.Node) -> int:
    """A negative axis made positive when the input rank is known (Split's python-side sizes need it)."""
    if axis < 0 and n.inputs[0].shape is not None:
        return axis + len(n.inputs[0].shape)
    return axis


def _opt_list(v):
    return list(v) if isinstance(v, (list, tuple)) else v


# -- converters ---------------------------------------------------------------------------------
@converter("Constant")
def constant(em, x):
    val = next(iter(x.attrs.values()))
    if isinstance(val, gs.Constant):
        return [em.const(val)]
    arr = np.asarray(val)
    if isinstance(val, (int, float, list)):  # value_int(s) / value_float(s)
        if np.issubdtype(arr.dtype, np.integer):
            return [x.shape_out(val)]
        return [x.tensor_out(em.call(em.torch.tensor, val))]
    return [em.const(gs.Constant(x.node.outputs[0].name + "_v", arr))]


@converter("Shape")
def shape(em, x):
    src = x.ins[0]
    return [Val(em.call(_shape, src.v if not src.shape_like else em.tensor(src), x.attrs.get("start", 0), x.attrs.get("end")),
                True, np.int64)]


@converter("Size")
def size(em, x):
    return [Val(em.call(_size, em.tensor(x.ins[0])), True, np.int64)]


def _reshape_shape(em, x):
    return [x.ins[0]]  # a 0/1-D shape value reshaped to 0/1-D: only [v] <-> v matters, and lists carry both


@converter("Reshape", shape=_reshape_shape)
def reshape(em, x):
    return [x.tensor_out(em.call(_reshape, em.tensor(x.ins[0]), em.shape_arg(x.ins[1]), int(x.attrs.get("allowzero", 0))))]


@converter("Transpose")
def transpose(em, x):
    perm = x.attrs.get("perm")
    return [x.tensor_out(em.call(_transpose, em.tensor(x.ins[0]), list(perm) if perm is not None else None))]


def _concat_shape(em, x):
    return [x.shape_out(em.call(sm.s_concat, *[v.v for v in x.ins]))]


@converter("Concat", shape=_concat_shape)
def concat(em, x):
    return [x.tensor_out(em.call(em.torch.cat, [em.tensor(v) for v in x.ins], int(x.attrs["axis"])))]


@converter("Split")
def split(em, x):
    n = x.node
    sizes = em.shape_arg(x.input(1)) if x.input(1) is not None else x.attrs.get("split")
    num = int(x.attrs.get("num_outputs", len(n.outputs)))
    parts = em.call(_split, em.tensor(x.ins[0]), _axis(x.attrs.get("axis", 0), n), _opt_list(sizes), num)
    return [x.tensor_out(em.call(operator.getitem, parts, i)) for i in range(len(n.outputs))]


def _slice_shape(em, x):
    if len(x.ins) < 3:
        return None
    st, en = em.literal(x.ins[1]), em.literal(x.ins[2])
    step = em.literal(x.input(4)) if x.input(4) is not None else [1]
    if st is None or en is None or step is None or len(st) != 1:
        return None
    return [x.shape_out(em.call(sm.s_slice, x.ins[0].v, st[0], en[0], step[0]))]


@converter("Slice", shape=_slice_shape)
def slice_(em, x):
    axes = em.shape_arg(x.input(3)) if x.input(3) is not None else None
    steps = em.shape_arg(x.input(4)) if x.input(4) is not None else None
    return [x.tensor_out(em.call(_slice, em.tensor(x.ins[0]), em.shape_arg(x.ins[1]), em.shape_arg(x.ins[2]), axes, steps))]


def _gather_shape(em, x):
    if int(x.attrs.get("axis", 0)) != 0:
        return None
    return [x.shape_out(em.call(sm.s_gather, x.ins[0].v, x.ins[1].v))]


@converter("Gather", shape=_gather_shape)
def gather(em, x):
    idx = x.ins[1].v if x.ins[1].shape_like else em.tensor(x.ins[1])  # Python indices stay Python
    return [x.tensor_out(em.call(_gather, em.tensor(x.ins[0]), idx, int(x.attrs.get("axis", 0))))]


def _unsqueeze_shape(em, x):
    return [x.shape_out(em.call(sm.s_unsqueeze, x.ins[0].v))]


@converter("Unsqueeze", shape=_unsqueeze_shape)
def unsqueeze(em, x):
    axes = em.shape_arg(x.ins[1]) if len(x.ins) > 1 else list(x.attrs["axes"])
    return [x.tensor_out(em.call(_unsqueeze, em.tensor(x.ins[0]), axes))]


def _squeeze_shape(em, x):
    return [x.shape_out(em.call(sm.s_squeeze, x.ins[0].v))]


@converter("Squeeze", shape=_squeeze_shape)
def squeeze(em, x):
    axes = em.shape_arg(x.input(1)) if x.input(1) is not None else x.attrs.get("axes")
    return [x.tensor_out(em.call(_squeeze, em.tensor(x.ins[0]), _opt_list(axes)))]


@converter("Flatten")
def flatten(em, x):
    return [x.tensor_out(em.call(_flatten, em.tensor(x.ins[0]), int(x.attrs.get("axis", 1))))]


@converter("Expand")
def expand(em, x):
    return [x.tensor_out(em.call(_expand, em.tensor(x.ins[0]), em.shape_arg(x.ins[1])))]


@converter("Tile")
def tile(em, x):
    return [x.tensor_out(em.call(_tile, em.tensor(x.ins[0]), em.shape_arg(x.ins[1])))]


@converter("ConstantOfShape")
def constant_of_shape(em, x):
    val = x.attrs.get("value")
    arr = np.asarray(val.values if isinstance(val, gs.Constant) else (val if val is not None else np.zeros(1, np.float32)))
    return [Val(em.call(_const_of_shape, em.shape_arg(x.ins[0]), arr.reshape(-1)[0].item(), tdtype(arr.dtype)), False, arr.dtype)]


@converter("Range")
def range_(em, x):
    args = [v.v if v.shape_like else em.tensor(v) for v in x.ins]
    return [x.tensor_out(em.call(_range, *args, tdtype(x.out_dtype)))]


@converter("Trilu")
def trilu(em, x):
    k = em.scalar(x.input(1)) if x.input(1) is not None else 0
    return [x.tensor_out(em.call(_trilu, em.tensor(x.ins[0]), k, int(x.attrs.get("upper", 1))))]
