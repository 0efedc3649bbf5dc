"""Structural matching helpers: producers, consumers, constant values; checks return a reason string."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

__all__ = [
    "Mismatch",
    "consumers",
    "dims",
    "eval_small",
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
    if node is not None and node.op == "Identity":
        return const_value(node.inputs[0])  # the legacy exporter shares weights through Identity
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
    """A one-element constant (or small constant expression) as a Python float, else None."""
    v = eval_small(t)
    if v is None or v.size != 1:
        return None
    return float(v.reshape(()))


_SMALL_OPS = {
    "Sqrt": np.sqrt, "Reciprocal": np.reciprocal, "Neg": np.negative, "Identity": lambda a: a,
    "Div": lambda a, b: a / b, "Mul": lambda a, b: a * b, "Add": lambda a, b: a + b, "Sub": lambda a, b: a - b,
}


def eval_small(t: gs.Tensor, depth: int = 12) -> np.ndarray | None:
    """Evaluate a small constant expression (scale = 1/√(head dim) chains) without running fold.

    Handles constants, Shape (only the statically known dims it is sliced or gathered to), Slice,
    Gather, Cast and elementwise arithmetic; returns None when any part is not known.
    """
    v = const_value(t)
    if v is not None or depth == 0:
        return v
    node = producer(t)
    if node is None:
        return None
    op = node.op
    if op == "Shape":
        return None  # only through Slice/Gather below, which pick the static dims
    if op in ("Slice", "Gather") and producer(node.inputs[0]) is not None and producer(node.inputs[0]).op == "Shape":
        shp = node.inputs[0].inputs[0].inputs[0].shape
        if shp is None:
            return None
        full = [d if isinstance(d, int) and d >= 0 else None for d in shp]
        idx = [eval_small(i, depth - 1) for i in node.inputs[1:] if not i.is_empty()]
        if any(i is None for i in idx):
            return None
        if op == "Gather":
            picked = np.asarray(full, dtype=object)[idx[0].astype(np.int64)]
        else:
            start, end = int(idx[0].ravel()[0]), int(idx[1].ravel()[0])
            step = int(idx[3].ravel()[0]) if len(idx) > 3 else 1
            picked = np.asarray(full[slice(start, end, step)], dtype=object)
        if any(d is None for d in np.ravel(picked)):
            return None
        return np.asarray(picked, dtype=np.int64)
    if op == "Cast":
        a = eval_small(node.inputs[0], depth - 1)
        if a is None:
            return None
        import onnx

        return a.astype(onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"]))
    if op in ("Unsqueeze", "Squeeze", "Concat"):
        args = [eval_small(i, depth - 1) for i in node.inputs[:1 if op != "Concat" else None]]
        if any(a is None or a.size > 16 for a in args):
            return None
        if op == "Concat":
            return np.concatenate([np.atleast_1d(a) for a in args], axis=node.attrs.get("axis", 0)) if args[0].ndim <= 1 else None
        return args[0].reshape(-1) if op == "Unsqueeze" and args[0].ndim == 0 else (args[0].reshape(()) if args[0].size == 1 and op == "Squeeze" else None)
    if op in _SMALL_OPS:
        args = [eval_small(i, depth - 1) for i in node.inputs]
        if any(a is None for a in args) or any(a.size > 16 for a in args):
            return None
        return np.asarray(_SMALL_OPS[op](*args))
    return None


def dims(t: gs.Tensor) -> list | None:
    """The tensor's shape with ints for known dims and None for symbolic ones (None if rank unknown)."""
    if t.shape is None:
        return None
    return [d if isinstance(d, int) and d >= 0 else None for d in t.shape]


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
