"""Reductions and scans: Reduce{Mean,Sum,Max,Min,Prod,SumSquare}, ArgMax/ArgMin, CumSum."""

from __future__ import annotations

import math

from sdgraph.targets.torch_fx import shape_math as sm
from sdgraph.targets.torch_fx._values import torch_mod
from sdgraph.targets.torch_fx.registry import converter

__all__ = ["REDUCE_KINDS"]

REDUCE_KINDS = {"ReduceMean": "mean", "ReduceSum": "sum", "ReduceMax": "max", "ReduceMin": "min",
                "ReduceProd": "prod", "ReduceSumSquare": "sumsquare"}


def _reduce(kind, x, axes, keepdims, noop_empty):
    torch = torch_mod()
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
        if x.dtype == torch.bool:
            fill = kind != "max"
        elif x.is_floating_point():
            fill = -math.inf if kind == "max" else math.inf
        else:
            fill = torch.iinfo(x.dtype).min if kind == "max" else torch.iinfo(x.dtype).max
        return torch.full(shape, fill, dtype=x.dtype)
    return fn(x, dim=axes, keepdim=bool(keepdims))


def _argmax(x, axis, keepdims, last, is_max=True):
    torch = torch_mod()
    if last:
        x = torch.flip(x, [axis])
    out = torch.argmax(x, dim=axis, keepdim=bool(keepdims)) if is_max else torch.argmin(x, dim=axis, keepdim=bool(keepdims))
    if last:
        out = x.shape[axis] - 1 - out
    return out


def _cumsum(x, axis, exclusive, reverse):
    torch = torch_mod()
    if reverse:
        x = torch.flip(x, [axis])
    y = torch.cumsum(x, axis)
    if exclusive:
        y = y - x
    if reverse:
        y = torch.flip(y, [axis])
    return y


def _reduce_shape(em, x):
    if x.node.op == "ReduceProd" and x.input(1) is None:  # the element count of a shape
        return [x.shape_out(em.call(sm.s_prod, x.ins[0].v, int(x.attrs.get("keepdims", 1))))]
    return None


@converter(*REDUCE_KINDS, shape=_reduce_shape)
def reduce(em, x):
    axes = em.shape_arg(x.input(1)) if x.input(1) is not None else x.attrs.get("axes")
    axes = list(axes) if isinstance(axes, (list, tuple)) else axes
    return [x.tensor_out(em.call(_reduce, REDUCE_KINDS[x.node.op], em.tensor(x.ins[0]), axes, int(x.attrs.get("keepdims", 1)),
                                 int(x.attrs.get("noop_with_empty_axes", 0))))]


@converter("ArgMax", "ArgMin")
def argmax(em, x):
    a = x.attrs
    return [x.tensor_out(em.call(_argmax, em.tensor(x.ins[0]), int(a.get("axis", 0)), int(a.get("keepdims", 1)),
                                 int(a.get("select_last_index", 0)), x.node.op == "ArgMax"))]


@converter("CumSum")
def cumsum(em, x):
    return [x.tensor_out(em.call(_cumsum, em.tensor(x.ins[0]), em.scalar(x.ins[1]), int(x.attrs.get("exclusive", 0)),
                                 int(x.attrs.get("reverse", 0))))]
