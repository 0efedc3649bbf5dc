"""Structural matching helpers: producers, consumers, constant values; checks return a reason string."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

__all__ = [
    "Mismatch",
    "consumers",
    "const_value",
    "producer",
    "scalar",
    "single_consumer",
    "skip_identity_casts",
]


class Mismatch(Exception):
    """Raised inside a matcher with the reason the candidate was rejected (a near miss)."""


def producer(t: gs.Tensor) -> gs.Node | None:
    """The node that writes ``t`` (None for graph inputs and constants)."""
    return t.inputs[0] if isinstance(t, gs.Variable) and len(t.inputs) == 1 else None


def consumers(t: gs.Tensor) -> list[gs.Node]:
    return list(t.outputs)


def single_consumer(t: gs.Tensor, op: str | tuple[str, ...] | None = None, allow_outputs: bool = False) -> gs.Node:
    """The one node reading ``t`` (of type ``op`` if given), else Mismatch."""
    users = t.outputs
    if len(users) != 1:
        raise Mismatch(f"{t.name} has {len(users)} consumers, expected 1")
    node = users[0]
    if op is not None and node.op not in ((op,) if isinstance(op, str) else op):
        raise Mismatch(f"{t.name} feeds {node.op}, expected {op}")
    return node


def const_value(t: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor (gs.Constant or a Constant node's output), else None."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    node = producer(t)
    if node is not None and node.op == "Constant":
        v = node.attrs.get("value")
        if isinstance(v, gs.Constant):
            return np.asarray(v.values)
        for key in ("value_float", "value_int"):
            if key in node.attrs:
                return np.asarray(node.attrs[key])
        for key in ("value_floats", "value_ints"):
            if key in node.attrs:
                return np.asarray(node.attrs[key])
    return None


def scalar(t: gs.Tensor) -> float | None:
    """A one-element constant as a Python float, else None."""
    v = const_value(t)
    if v is None or v.size != 1:
        return None
    return float(v.reshape(()))


def _dtype(t: gs.Tensor):
    return None if t.dtype is None else np.dtype(t.dtype)


def skip_identity_casts(t: gs.Tensor, backward: bool = True) -> tuple[gs.Tensor, list[gs.Node]]:
    """Walk through Casts that do not change the dtype (fp32 upcast-attention Casts in an fp32 model).

    Backward: from a tensor to the one the Casts read. A Cast that changes the dtype raises Mismatch.
    """
    seen: list[gs.Node] = []
    while True:
        node = producer(t)
        if node is None or node.op != "Cast":
            return t, seen
        src = node.inputs[0]
        to = node.attrs.get("to")
        if _dtype(src) is None or src.dtype != t.dtype and _dtype(t) is not None and _dtype(src) != _dtype(t):
            raise Mismatch(f"Cast {node.name} changes dtype ({_dtype(src)} -> {_dtype(t)}); mixed-precision attention is left alone")
        del to
        seen.append(node)
        t = src
