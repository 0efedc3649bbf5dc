"""Values during emission and the dtype tables shared by every converter."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

__all__ = ["Val", "torch_mod", "tdtype", "np_dtype_or_none", "onnx_to_np_or_none", "const_array", "has_node", "ident",
           "SMALL_CONST"]

SMALL_CONST = 64  # int constants up to this many elements become Python values (shape arithmetic)


def torch_mod():
    import torch

    return torch


def tdtype(np_dtype):
    """The torch dtype of a numpy dtype (KeyError for one the emitter does not map)."""
    torch = torch_mod()
    return {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16, np.dtype(np.float64): torch.float64,
            np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32, np.dtype(np.int8): torch.int8,
            np.dtype(np.uint8): torch.uint8, np.dtype(np.bool_): torch.bool, np.dtype(np.int16): torch.int16}[np.dtype(np_dtype)]


def np_dtype_or_none(dt):
    """``dt`` as a numpy dtype when the emitter maps it to torch, else None."""
    try:
        d = np.dtype(dt)
        tdtype(d)
        return d
    except (TypeError, KeyError):
        return None


def onnx_to_np_or_none(to):
    """The numpy dtype of ONNX type enum ``to`` when the emitter maps it, else None."""
    try:
        return np_dtype_or_none(onnx.helper.tensor_dtype_to_np_dtype(int(to)))
    except (TypeError, ValueError, KeyError):
        return None


class Val:
    """An ONNX value during emission: a tensor (fx node) or shape arithmetic (Python value or fx node of one)."""

    __slots__ = ("v", "shape_like", "dtype", "lit")

    def __init__(self, v, shape_like: bool, dtype, lit=None):
        self.v, self.shape_like, self.dtype = v, shape_like, np.dtype(dtype) if dtype is not None else None
        self.lit = lit  # small constant tensors: their values, known at emission time


def const_array(t: gs.Constant) -> np.ndarray:
    """The constant's values without pinning them in the graph (``.values`` would replace lazy weights)."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    v = t._values
    return v.load() if isinstance(v, LazyValues) else np.asarray(v)


def has_node(v) -> bool:
    """Whether ``v`` (a Python value, maybe nested lists) holds an fx node: not known at emission time."""
    import torch.fx as fx

    if isinstance(v, fx.Node):
        return True
    if isinstance(v, (list, tuple)):
        return any(has_node(x) for x in v)
    return False


def ident(name: str) -> str:
    """A Python identifier for an ONNX tensor name (fx placeholder names)."""
    out = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in name)
    return out if out and not out[0].isdigit() else "i_" + out
