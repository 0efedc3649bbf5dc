"""Elementwise ops: identity/cast, unary math, binary arithmetic and logic, activations, Where, Clip."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from sdgraph.targets.torch_fx import shape_math as sm
from sdgraph.targets.torch_fx._values import Val, onnx_to_np_or_none, tdtype, torch_mod
from sdgraph.targets.torch_fx.registry import converter

__all__ = ["UNARY", "BINARY"]

UNARY = {
    "Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Exp": "exp", "Log": "log", "Sqrt": "sqrt",
    "Reciprocal": "reciprocal", "Neg": "neg", "Abs": "abs", "Erf": "erf", "Sin": "sin", "Cos": "cos",
    "Floor": "floor", "Ceil": "ceil", "Not": "logical_not", "Sign": "sign", "Round": "round",
}
BINARY = {
    "Add": "add", "Sub": "sub", "Mul": "mul", "Pow": "pow", "Equal": "eq", "Less": "lt", "Greater": "gt",
    "LessOrEqual": "le", "GreaterOrEqual": "ge", "And": "logical_and", "Or": "logical_or", "Xor": "logical_xor",
}


# -- runtime helpers (fx call targets) ----------------------------------------------------------
def _div(a, b, is_int):
    torch = torch_mod()
    return torch.div(a, b, rounding_mode="trunc") if is_int else a / b


def _mod(a, b, fmod):
    torch = torch_mod()
    return torch.fmod(a, b) if fmod else torch.remainder(a, b)


def _where(c, a, b):
    return torch_mod().where(c, a, b)


def _clip(x, lo, hi):
    if lo is None and hi is None:
        return x
    return torch_mod().clamp(x, min=lo, max=hi)


def _gelu(x, approximate):
    return torch_mod().nn.functional.gelu(x, approximate=approximate)


def _hard_sigmoid(x, alpha, beta):
    return torch_mod().clamp(x * alpha + beta, 0.0, 1.0)


# -- identity and casts -------------------------------------------------------------------------
def _dropout_ok(n: gs.Node, opset: int) -> str | None:
    if len(n.inputs) >= 3 and n.inputs[2].name:
        return "Dropout training_mode input not mapped (inference only)"
    if len(n.outputs) > 1 and n.outputs[1].name:
        return "Dropout mask output not mapped"
    return None


@converter("Identity")
def identity(em, x):
    return [x.ins[0]]


@converter("Dropout", supports=_dropout_ok)
def dropout(em, x):
    return [x.ins[0]]


def _cast_ok(n: gs.Node, opset: int) -> str | None:
    if onnx_to_np_or_none(n.attrs.get("to")) is None:
        return f"cast to onnx type {n.attrs.get('to')} not mapped"
    return None


def _cast(em, x, to: np.dtype):
    src = x.ins[0]
    if src.shape_like:
        kind = "bool" if to == np.bool_ else "int" if np.issubdtype(to, np.integer) else "float"
        return [Val(em.call(sm.s_cast, src.v, kind), True, to)]
    return [Val(em.method("to", src.v, tdtype(to)), False, to)]


@converter("Cast", supports=_cast_ok)
def cast(em, x):
    return _cast(em, x, onnx_to_np_or_none(x.attrs["to"]))


@converter("CastLike")
def cast_like(em, x):
    return _cast(em, x, x.ins[1].dtype)


# -- unary and binary math ----------------------------------------------------------------------
def _unary_shape(em, x):
    op = x.node.op
    if op == "Neg":
        return [x.shape_out(em.call(sm.s_neg, x.ins[0].v))]
    if op in sm.UNARY:
        return [x.shape_out(em.call(sm.UNARY[op], x.ins[0].v))]
    return None


@converter(*UNARY, shape=_unary_shape)
def unary(em, x):
    return [x.tensor_out(em.call(getattr(em.torch, UNARY[x.node.op]), em.tensor(x.ins[0])))]


def _binary_shape(em, x):
    fn = sm.BINARY.get(x.node.op)
    return [x.shape_out(em.call(fn, x.ins[0].v, x.ins[1].v))] if fn is not None else None


@converter(*BINARY, shape=_binary_shape)
def binary(em, x):
    return [x.tensor_out(em.call(getattr(em.torch, BINARY[x.node.op]), em.tensor(x.ins[0]), em.tensor(x.ins[1])))]


def _div_shape(em, x):
    return [x.shape_out(em.call(sm.s_idiv if x.int_output else sm.s_fdiv, x.ins[0].v, x.ins[1].v))]


@converter("Div", shape=_div_shape)
def div(em, x):
    return [x.tensor_out(em.call(_div, em.tensor(x.ins[0]), em.tensor(x.ins[1]), x.int_output))]


def _mod_shape(em, x):
    if int(x.attrs.get("fmod", 0)):  # C fmod differs from Python's % on negative ints: tensor path
        return None
    return [x.shape_out(em.call(sm.BINARY["Mod"], x.ins[0].v, x.ins[1].v))]


@converter("Mod", shape=_mod_shape)
def mod(em, x):
    return [x.tensor_out(em.call(_mod, em.tensor(x.ins[0]), em.tensor(x.ins[1]), int(x.attrs.get("fmod", 0))))]


def _variadic_shape(em, x):
    if x.node.op in ("Max", "Min") and len(x.ins) == 2:
        return [x.shape_out(em.call(sm.BINARY[x.node.op], x.ins[0].v, x.ins[1].v))]
    return None


@converter("Max", "Min", "Sum", shape=_variadic_shape)
def variadic(em, x):
    fn = {"Max": em.torch.maximum, "Min": em.torch.minimum, "Sum": em.torch.add}[x.node.op]
    acc = em.tensor(x.ins[0])
    for v in x.ins[1:]:
        acc = em.call(fn, acc, em.tensor(v))
    return [x.tensor_out(acc)]


def _where_shape(em, x):
    return [x.shape_out(em.call(sm.s_where, *(v.v for v in x.ins[:3])))]


@converter("Where", shape=_where_shape)
def where(em, x):
    return [x.tensor_out(em.call(_where, *(em.tensor(v) for v in x.ins[:3])))]


@converter("Clip")
def clip(em, x):
    lo = em.tensor(x.input(1)) if x.input(1) is not None else x.attrs.get("min")
    hi = em.tensor(x.input(2)) if x.input(2) is not None else x.attrs.get("max")
    return [x.tensor_out(em.call(_clip, em.tensor(x.ins[0]), lo, hi))]


# -- activations --------------------------------------------------------------------------------
@converter("Gelu")
def gelu(em, x):
    return [x.tensor_out(em.call(_gelu, em.tensor(x.ins[0]), x.attrs.get("approximate", "none")))]


@converter("LeakyRelu")
def leaky_relu(em, x):
    f = em.torch.nn.functional
    return [x.tensor_out(em.call(f.leaky_relu, em.tensor(x.ins[0]), float(x.attrs.get("alpha", 0.01))))]


@converter("Elu")
def elu(em, x):
    return [x.tensor_out(em.call(em.torch.nn.functional.elu, em.tensor(x.ins[0]), float(x.attrs.get("alpha", 1.0))))]


@converter("Softplus")
def softplus(em, x):
    return [x.tensor_out(em.call(em.torch.nn.functional.softplus, em.tensor(x.ins[0])))]


@converter("HardSigmoid")
def hard_sigmoid(em, x):
    return [x.tensor_out(em.call(_hard_sigmoid, em.tensor(x.ins[0]), float(x.attrs.get("alpha", 0.2)),
                                 float(x.attrs.get("beta", 0.5))))]

