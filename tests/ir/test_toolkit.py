"""The rewrite toolkit on small graphs: GraphBuilder, edit helpers, the one inliner (only= / keep=)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from sdgraph.errors import UsageError
from sdgraph.ir import runtime
from sdgraph.ir.build import GraphBuilder
from sdgraph.ir.canonical import inline_functions, make_node
from sdgraph.ir.edit import insert_after, remove_dead, replace_all_uses
from sdgraph.ir.model import CANONICAL_DOMAIN, Model
from sdgraph.passes.verifier import verify_structure
from tests.graphs import ADD_MUL


def _model() -> Model:
    return Model.from_onnx_text(ADD_MUL)


def test_builder_returns_outputs_with_unique_names_and_constants_from_values():
    m = _model()
    g = m.graph
    x = g.inputs[0]
    b = GraphBuilder(g)
    y1 = b.op("Mul", [x, 0.5], name="scale", dtype=np.float32)
    y2 = b.op("Mul", [y1, np.array([2.0], np.float64)], name="scale")
    n1, n2 = y1.inputs[0], y2.inputs[0]
    assert (n1.name, n2.name) == ("scale", "scale_1") and y1.name != y2.name
    assert y1.name == "scale/out" and y2.name == "scale_1/out"
    c1, c2 = n1.inputs[1], n2.inputs[1]
    assert isinstance(c1, gs.Constant) and c1.values.dtype == np.float32 and c1.name == "scale/in1"
    assert c2.values.dtype == np.float64  # arrays keep their dtype
    assert y1.dtype == np.float32 and n2 in g.nodes
    names = [t for t in g.tensors()]
    assert len(names) == len(set(names))
    parts = b.node("Split", [x], 2, name="halves", attrs={"axis": 1, "num_outputs": 2})
    assert [o.name for o in parts.outputs] == ["halves/out0", "halves/out1"]
    assert b.unique("x") == "x_1"  # graph input names are taken too


def test_builder_out_takes_over_an_existing_tensor():
    m = _model()
    g = m.graph
    y = g.outputs[0]
    old = y.inputs[0]
    new = GraphBuilder(g).op("Sub", [g.inputs[0], g.inputs[0]], name="zero", out=y)
    assert new is y and y.inputs[0].op == "Sub" and old.outputs == []
    remove_dead(g)
    assert [n.op for n in g.nodes] == ["Sub"]
    out = runtime.run(m, {"x": np.ones((2, 4), np.float32)})
    assert not out["y"].any()


def test_replace_all_uses_and_insert_after_keep_the_interface():
    m = _model()
    g = m.graph
    x, y = g.inputs[0], g.outputs[0]
    b = GraphBuilder(g)
    feeds = {"x": np.arange(8, dtype=np.float32).reshape(2, 4)}
    ref = runtime.run(m, feeds)["y"]
    neg = insert_after(b, y, "Neg", name="negate", dtype=np.float32)
    assert neg.name == "y" and g.outputs[0] is neg and y.name == "y_pre"
    verify_structure(m, ["y"])
    np.testing.assert_array_equal(runtime.run(m, feeds)["y"], -ref)
    # every Mul reading x now reads Relu(x): two readers rewired, none skipped
    relu = b.op("Relu", [x], name="relu", dtype=np.float32)
    assert replace_all_uses(g, x, relu, skip=relu.inputs[0]) == 2
    assert [n.op for n in x.outputs] == ["Relu"] and len(relu.outputs) == 2
    feeds_neg = {"x": -np.ones((2, 4), np.float32)}
    np.testing.assert_array_equal(runtime.run(m, feeds_neg)["y"], np.zeros((2, 4), np.float32))


def test_remove_dead_counts_and_keeps_graph_inputs():
    m = _model()
    g = m.graph
    GraphBuilder(g).op("Relu", [g.inputs[0]], name="unused")
    before = len(g.nodes)
    assert remove_dead(g) == 1 and len(g.nodes) == before - 1 and [t.name for t in g.inputs] == ["x"]


def _with_canonical_calls() -> tuple[Model, dict]:
    """x[1,2,4,8] -> GroupNorm -> Attention(q=k=v) -> GeGLU, as canonical calls."""
    rng = np.random.default_rng(0)
    x = gs.Variable("x", dtype=np.float32, shape=[1, 2, 4, 8])
    g = gs.Graph(inputs=[x], opset=17)
    m = Model(g)
    b = GraphBuilder(g)
    n = b.var("n", dtype=np.float32)
    make_node(m, "GroupNorm", [x, b.const("gamma", rng.random((2, 1, 1), np.float32)),
                               b.const("beta", rng.random((2, 1, 1), np.float32))], [n],
              {"groups": 2, "epsilon": 1e-5}, "gn", builder=b)
    a = b.var("a", dtype=np.float32)
    make_node(m, "Attention", [n, n, n], [a], {"scale": 0.35, "num_heads": 2}, "attn", builder=b)
    y = b.var("y", dtype=np.float32)
    make_node(m, "GeGLU", [a], [y], {}, "geglu", builder=b)
    g.outputs = [y]
    feeds = {"x": rng.standard_normal((1, 2, 4, 8)).astype(np.float32)}
    return m, feeds


def _canonical_ops(m: Model) -> list[str]:
    return sorted(n.op for n in m.graph.nodes if n.domain == CANONICAL_DOMAIN)


def test_inliner_all_only_and_keep_modes_keep_the_numbers():
    m, feeds = _with_canonical_calls()
    ref = runtime.run(m, feeds)["y"]
    only, _ = _with_canonical_calls()
    assert inline_functions(only, only=["GeGLU"]) == 1
    assert _canonical_ops(only) == ["Attention", "GroupNorm"]
    keep, _ = _with_canonical_calls()
    assert inline_functions(keep, keep={(CANONICAL_DOMAIN, "Attention")}) == 2
    assert _canonical_ops(keep) == ["Attention"]
    assert inline_functions(m) == 3 and _canonical_ops(m) == []
    for model in (only, keep, m):
        verify_structure(model, ["y"])
        np.testing.assert_allclose(runtime.run(model, feeds)["y"], ref, rtol=1e-5, atol=1e-5)


def test_inliner_builds_missing_canonical_bodies_and_inlines_nested_calls():
    m, feeds = _with_canonical_calls()
    ref = runtime.run(m, feeds)["y"]
    # a model-local function in another domain that calls a canonical op
    wrapper = helper.make_function("my.domain", "Wrap", ["x"], ["y"],
                                   [helper.make_node("GeGLU", ["x"], ["y"], domain=CANONICAL_DOMAIN)],
                                   opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(CANONICAL_DOMAIN, 1)])
    m.add_function(wrapper)
    geglu = next(n for n in m.graph.nodes if n.op == "GeGLU")
    geglu.op, geglu.domain = "Wrap", "my.domain"
    del m.functions[(CANONICAL_DOMAIN, "GeGLU")]  # the inliner supplies the standard body itself
    assert inline_functions(m, keep=["Attention"]) == 3  # GroupNorm, Wrap, then the GeGLU inside Wrap
    assert _canonical_ops(m) == ["Attention"] and not any(n.op == "Wrap" for n in m.graph.nodes)
    np.testing.assert_allclose(runtime.run(m, feeds)["y"], ref, rtol=1e-5, atol=1e-5)


def test_inliner_refuses_both_modes_and_a_bare_string():
    m, _ = _with_canonical_calls()
    with pytest.raises(UsageError, match="not both"):
        inline_functions(m, only=["GeGLU"], keep=["Attention"])
    with pytest.raises(UsageError, match="not the string 'GeGLU'"):
        inline_functions(m, only="GeGLU")
    assert _canonical_ops(m) == ["Attention", "GeGLU", "GroupNorm"]
