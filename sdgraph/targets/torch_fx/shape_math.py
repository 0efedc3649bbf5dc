"""Shape arithmetic kept as Python ints and lists: the fx call targets of the converters' ``shape`` paths.

Plain Python so dynamo traces them and dynamic shapes stay symbolic ints instead of tensors.
"""

from __future__ import annotations

import math
import operator

from sdgraph.targets.torch_fx._values import torch_mod

__all__ = ["as_tensor", "BINARY", "s_idiv", "s_fdiv", "s_gather", "s_concat", "s_unsqueeze", "s_squeeze", "s_slice",
           "s_cast", "s_where", "s_neg", "s_unary", "s_prod", "UNARY"]


def as_tensor(v, dtype):
    torch = torch_mod()
    if isinstance(v, torch.Tensor):
        return v.to(dtype)
    return torch.tensor(v, dtype=dtype)


def _broadcast(fn):
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


BINARY = {
    "Add": _broadcast(operator.add), "Sub": _broadcast(operator.sub), "Mul": _broadcast(operator.mul),
    "Equal": _broadcast(operator.eq), "Less": _broadcast(operator.lt), "Greater": _broadcast(operator.gt),
    "LessOrEqual": _broadcast(operator.le), "GreaterOrEqual": _broadcast(operator.ge),
    "Max": _broadcast(max), "Min": _broadcast(min),
    "Mod": _broadcast(operator.mod),  # ONNX Mod with fmod=0 is Python's modulo for integers
}
s_idiv = _broadcast(_idiv)  # ONNX integer Div truncates toward zero
s_fdiv = _broadcast(operator.truediv)


def s_gather(data, idx):
    if isinstance(idx, list):
        return [data[i] for i in idx]
    return data[idx]


def s_concat(*parts):
    out = []
    for p in parts:
        out.extend(p if isinstance(p, list) else [p])
    return out


def s_unsqueeze(v):
    return [v]


def s_squeeze(v):
    return v[0]


def s_slice(v, start, end, step):
    n = len(v)
    start = max(start + n, 0) if start < 0 else min(start, n)
    if step > 0:
        end = max(end + n, 0) if end < 0 else min(end, n)
    else:
        end = end + n if end < 0 else min(end, n - 1)
        if end < 0:
            return v[start::step]
    return v[start:end:step]


def s_cast(v, kind):
    f = {"int": int, "float": float, "bool": bool}[kind]
    return [f(x) for x in v] if isinstance(v, list) else f(v)


def s_where(c, a, b):
    if isinstance(c, list):
        n = len(c)
        a = a if isinstance(a, list) else [a] * n
        b = b if isinstance(b, list) else [b] * n
        return [x if k else y for k, x, y in zip(c, a, b)]
    return a if c else b


def s_neg(v):
    return [-x for x in v] if isinstance(v, list) else -v


def s_unary(fn):
    def apply(v):
        return [fn(x) for x in v] if isinstance(v, list) else fn(v)

    return apply


UNARY = {"Floor": s_unary(math.floor), "Ceil": s_unary(math.ceil), "Sqrt": s_unary(math.sqrt)}


def s_prod(v, keepdims):
    p = 1
    for x in v:
        p = p * x
    return [p] if keepdims else p
