"""Canonical ops in the ``ai.sdgraph`` domain: standard-op function bodies, ensure_function, and the inliner."""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import AttributeProto, helper

from sdgraph.errors import UsageError
from sdgraph.ir.build import GraphBuilder
from sdgraph.ir.model import CANONICAL_DOMAIN

__all__ = [
    "CANONICAL_OPS",
    "ensure_function",
    "function_proto",
    "inline_functions",
    "make_node",
]

log = logging.getLogger(__name__)

_F = AttributeProto.FLOAT
_I = AttributeProto.INT


def _const_node(out: str, ref: str, kind: int) -> onnx.NodeProto:
    """Constant whose value is the function attribute ``ref`` (value_float / value_int)."""
    n = helper.make_node("Constant", [], [out])
    attr = helper.make_attribute_ref("value_float" if kind == _F else "value_int", kind)
    attr.ref_attr_name = ref
    n.attribute.append(attr)
    return n


def _attention(masked: bool) -> tuple[list[str], list[onnx.NodeProto], list[str]]:
    # q, k, v: [B, H, S, D] (k and v share the key length). y = softmax(q·kᵀ·scale [+ mask]) · v
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["qk"]),
        _const_node("scale_f", "scale", _F),
        helper.make_node("CastLike", ["scale_f", "qk"], ["scale_c"]),
        helper.make_node("Mul", ["qk", "scale_c"], ["scores"]),
    ]
    logits = "scores"
    if masked:
        nodes.append(helper.make_node("Add", ["scores", "mask"], ["masked"]))
        logits = "masked"
    nodes += [
        helper.make_node("Softmax", [logits], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["y"]),
    ]
    return (["q", "k", "v", "mask"] if masked else ["q", "k", "v"]), nodes, ["scale", "num_heads"]


def _group_norm(silu: bool) -> tuple[list[str], list[onnx.NodeProto], list[str]]:
    # x: [N, C, ...]; gamma, beta broadcast against x (e.g. [C, 1, 1]); statistics over groups of C.
    nodes = [
        _const_node("g_i", "groups", _I),
        helper.make_node("Constant", [], ["zero_neg"], value=helper.make_tensor("zn", onnx.TensorProto.INT64, [2], [0, -1])),
        helper.make_node("Constant", [], ["one_d"], value=helper.make_tensor("od", onnx.TensorProto.INT64, [1], [1])),
        helper.make_node("Reshape", ["g_i", "one_d"], ["g_1"]),
        helper.make_node("Constant", [], ["idx0"], value=helper.make_tensor("i0", onnx.TensorProto.INT64, [1], [0])),
        helper.make_node("Constant", [], ["idx1"], value=helper.make_tensor("i1", onnx.TensorProto.INT64, [1], [-1])),
        helper.make_node("Concat", ["idx0", "g_1", "idx1"], ["gshape"], axis=0),
        helper.make_node("Reshape", ["x", "gshape"], ["xg"]),
        helper.make_node("Constant", [], ["one_f"], value=helper.make_tensor("of", onnx.TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("Constant", [], ["zero_f"], value=helper.make_tensor("zf", onnx.TensorProto.FLOAT, [1], [0.0])),
        helper.make_node("CastLike", ["one_f", "x"], ["one_c"]),
        helper.make_node("CastLike", ["zero_f", "x"], ["zero_c"]),
        helper.make_node("Expand", ["one_c", "g_1"], ["ones_g"]),
        helper.make_node("Expand", ["zero_c", "g_1"], ["zeros_g"]),
        helper.make_node("InstanceNormalization", ["xg", "ones_g", "zeros_g"], ["ng"]),
        _eps_node(),
        helper.make_node("Shape", ["x"], ["xshape"]),
        helper.make_node("Reshape", ["ng", "xshape"], ["n"]),
        helper.make_node("Mul", ["n", "gamma"], ["scaled"]),
    ]
    if silu:
        nodes += [
            helper.make_node("Add", ["scaled", "beta"], ["pre"]),
            helper.make_node("Sigmoid", ["pre"], ["sig"]),
            helper.make_node("Mul", ["pre", "sig"], ["y"]),
        ]
    else:
        nodes.append(helper.make_node("Add", ["scaled", "beta"], ["y"]))
    return ["x", "gamma", "beta"], nodes, ["groups", "epsilon"]


def _eps_node() -> onnx.NodeProto:
    # InstanceNormalization's epsilon comes from the function attribute; patched in _group_norm's node.
    return helper.make_node("Identity", ["ng"], ["ng_id"])


def _geglu() -> tuple[list[str], list[onnx.NodeProto], list[str]]:
    # x: [..., 2F] -> h[..., :F] * gelu_erf(x[..., F:])
    i64 = onnx.TensorProto.INT64
    nodes = [
        helper.make_node("Shape", ["x"], ["xs"]),
        helper.make_node("Constant", [], ["m1"], value=helper.make_tensor("m1", i64, [1], [-1])),
        helper.make_node("Constant", [], ["z"], value=helper.make_tensor("z", i64, [1], [0])),
        helper.make_node("Constant", [], ["two"], value=helper.make_tensor("two", i64, [1], [2])),
        helper.make_node("Constant", [], ["big"], value=helper.make_tensor("big", i64, [1], [2**62])),
        helper.make_node("Gather", ["xs", "m1"], ["last"], axis=0),
        helper.make_node("Div", ["last", "two"], ["half"]),
        helper.make_node("Slice", ["x", "z", "half", "m1"], ["h"]),
        helper.make_node("Slice", ["x", "half", "big", "m1"], ["gate"]),
        helper.make_node("Constant", [], ["sqrt2"], value=helper.make_tensor("s2", onnx.TensorProto.FLOAT, [], [float(np.sqrt(2.0))])),
        helper.make_node("Constant", [], ["one"], value=helper.make_tensor("one", onnx.TensorProto.FLOAT, [], [1.0])),
        helper.make_node("Constant", [], ["halff"], value=helper.make_tensor("hf", onnx.TensorProto.FLOAT, [], [0.5])),
        helper.make_node("CastLike", ["sqrt2", "x"], ["sqrt2c"]),
        helper.make_node("CastLike", ["one", "x"], ["onec"]),
        helper.make_node("CastLike", ["halff", "x"], ["halfc"]),
        helper.make_node("Div", ["gate", "sqrt2c"], ["gd"]),
        helper.make_node("Erf", ["gd"], ["ge"]),
        helper.make_node("Add", ["ge", "onec"], ["gp"]),
        helper.make_node("Mul", ["gate", "gp"], ["gm"]),
        helper.make_node("Mul", ["gm", "halfc"], ["gelu"]),
        helper.make_node("Mul", ["h", "gelu"], ["y"]),
    ]
    return ["x"], nodes, []


_BUILDERS: dict[str, Callable[[], tuple[list[str], list[onnx.NodeProto], list[str]]]] = {
    "Attention": lambda: _attention(False),
    "AttentionMasked": lambda: _attention(True),
    "GroupNorm": lambda: _group_norm(False),
    "GroupNormSilu": lambda: _group_norm(True),
    "GeGLU": _geglu,
}
CANONICAL_OPS = tuple(_BUILDERS)
"""Canonical op names. Attention*: q, k, v [B,H,S,D] (+ additive mask), attrs scale, num_heads.
GroupNorm*: x, gamma, beta, attrs groups, epsilon (optionally followed by SiLU). GeGLU: x."""


def function_proto(name: str, opset: int) -> onnx.FunctionProto:
    """The FunctionProto for canonical op ``name``, its body written for standard opset ``opset``."""
    if name not in _BUILDERS:
        raise UsageError(f"unknown canonical op {name!r} (known: {', '.join(CANONICAL_OPS)})")
    inputs, nodes, attrs = _BUILDERS[name]()
    if name.startswith("GroupNorm"):
        # epsilon is an attribute of InstanceNormalization: reference the function's attribute.
        inorm = next(n for n in nodes if n.op_type == "InstanceNormalization")
        ref = helper.make_attribute_ref("epsilon", _F)
        ref.ref_attr_name = "epsilon"
        inorm.attribute.append(ref)
        nodes = [n for n in nodes if n.op_type != "Identity"]
    for i, n in enumerate(nodes):
        n.name = f"{name}_{i}_{n.op_type}"
    return helper.make_function(
        CANONICAL_DOMAIN, name, inputs, ["y"], nodes,
        opset_imports=[helper.make_opsetid("", opset)], attributes=attrs,
    )


def ensure_function(model, name: str) -> onnx.FunctionProto:
    """Add canonical op ``name``'s definition to ``model`` (idempotent) and return it."""
    key = (CANONICAL_DOMAIN, name)
    fn = model.functions.get(key)
    if fn is None:
        if model.opset < 15:
            # Bodies use CastLike (opset 15); 14 -> 15 changes no existing op's semantics.
            model.opset_imports["" if "" in model.opset_imports else "ai.onnx"] = 15
        fn = function_proto(name, model.opset)
        model.add_function(fn)
    return fn


def make_node(model, name: str, inputs: list[gs.Tensor], outputs: list[gs.Tensor], attrs: dict, node_name: str,
              *, builder=None) -> gs.Node:
    """Insert canonical node ``name`` into ``model.graph`` (its function is added too).

    ``outputs`` are taken over (their old producers lose them). Pass the rewrite's GraphBuilder
    as ``builder`` when adding many nodes (one builder per pass keeps the name set once).
    """
    ensure_function(model, name)
    b = builder if builder is not None else GraphBuilder(model.graph)
    return b.node(name, inputs, list(outputs), name=node_name, domain=CANONICAL_DOMAIN, attrs=attrs)


def _attr_value(a: onnx.AttributeProto, actual: dict, defaults: dict):
    if a.ref_attr_name:
        if a.ref_attr_name in actual:
            return actual[a.ref_attr_name]
        return defaults.get(a.ref_attr_name)
    return helper.get_attribute_value(a)


def _to_gs_value(key: str, value):
    if isinstance(value, onnx.TensorProto):
        return gs.Constant(key, onnx.numpy_helper.to_array(value))
    if isinstance(value, bytes):
        return value.decode()
    return value


def _selector(refs) -> "Callable[[str, str], bool] | None":
    if refs is None:
        return None
    if isinstance(refs, str):
        raise UsageError(f"give a collection of function names, not the string {refs!r}")
    keys = {r if isinstance(r, tuple) else ("*", r) for r in refs}
    return lambda domain, op: (domain, op) in keys or ("*", op) in keys


def inline_functions(model, *, only=None, keep=None) -> int:
    """Replace calls of model-local functions with their bodies, in place: the one inliner.

    ``only``: inline just these functions; ``keep``: inline all but these (both are collections of
    op names, or ``(domain, op)`` keys; give at most one). Without either, every call is inlined,
    which is the fallback lowering for a target with no native kernel: the result uses standard
    ops only. Canonical ``ai.sdgraph`` ops whose function the model lacks get the standard body.
    Calls inside inlined bodies are inlined by the same rule. Weights stay where they are (no
    proto round trip). Returns how many calls were inlined.
    """
    if only is not None and keep is not None:
        raise UsageError("inline_functions: give only= or keep=, not both")
    want, skip = _selector(only), _selector(keep)

    def selected(node: gs.Node) -> bool:
        domain = node.domain or ""
        if (domain, node.op) not in model.functions and not (domain == CANONICAL_DOMAIN and node.op in _BUILDERS):
            return False
        return (want is None or want(domain, node.op)) and (skip is None or not skip(domain, node.op))

    graph = model.graph
    b = GraphBuilder(graph)
    count = 0
    for _ in range(16):  # nesting depth
        calls = [n for n in graph.nodes if selected(n)]
        if not calls:
            break
        for node in calls:
            _inline_call(model, b, node)
        done = {id(n) for n in calls}
        graph.nodes = [n for n in graph.nodes if id(n) not in done]
        count += len(calls)
    if count:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return count


def _inline_call(model, b, node: gs.Node) -> None:
    fn = model.functions.get((node.domain or "", node.op))
    if fn is None:
        fn = function_proto(node.op, max(model.opset, 15))
    defaults = {a.name: helper.get_attribute_value(a) for a in fn.attribute_proto}
    env: dict[str, gs.Tensor] = {}
    for formal, actual in zip(fn.input, node.inputs):
        env[formal] = actual
    for formal, actual in zip(fn.output, node.outputs):
        env[formal] = actual
    prefix = f"{node.name}/"

    def tensor(nm: str) -> gs.Tensor:
        if nm == "":
            return gs.Variable.empty()
        if nm not in env:
            env[nm] = b.var(prefix + nm)
        return env[nm]

    actual_attrs = dict(node.attrs)
    node.outputs.clear()
    node.inputs.clear()
    for k_body, body in enumerate(fn.node):
        attrs = {a.name: _to_gs_value(a.name, _attr_value(a, actual_attrs, defaults)) for a in body.attribute}
        attrs = {k: v for k, v in attrs.items() if v is not None}
        if body.op_type == "Constant" and body.output[0] not in fn.output:
            # Materialise constants directly (value_float / value_int / value tensors).
            (k, v), = attrs.items()
            arr = v.values if isinstance(v, gs.Constant) else np.array(v, dtype=np.float32 if isinstance(v, float) else np.int64)
            env[body.output[0]] = b.const(prefix + body.output[0], np.asarray(arr))
            continue
        b.node(body.op_type, [tensor(i) for i in body.input], [tensor(o) for o in body.output],
               name=prefix + (body.name or f"{k_body}_{body.op_type}"), domain=body.domain or None, attrs=attrs)
