"""sdgraph.ir.pattern on small graphs built in code: producers, constants, the scale evaluator, Casts."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from sdgraph.ir.model import Model
from sdgraph.ir.pattern import (
    Mismatch,
    const_value,
    consumers,
    dims,
    eval_small,
    producer,
    scalar,
    single_consumer,
    skip_identity_casts,
)
from tests.graphs import ADD_MUL

F32 = np.float32


def _tensors(m: Model) -> dict[str, gs.Tensor]:
    return m.graph.tensors()


def test_producer_and_consumers_on_add_mul():
    m = Model.from_onnx_text(ADD_MUL)
    t = _tensors(m)
    assert producer(t["x"]) is None  # graph input
    assert producer(t["y"]).op == "Add"
    assert sorted(n.outputs[0].name for n in consumers(t["d"])) == ["a", "b"]
    assert single_consumer(t["a"], "Add").outputs[0].name == "y"
    assert single_consumer(t["a"], ("Mul", "Add")).op == "Add"


def test_single_consumer_reasons():
    t = _tensors(Model.from_onnx_text(ADD_MUL))
    with pytest.raises(Mismatch, match="d has 2 consumers, expected 1"):
        single_consumer(t["d"])
    with pytest.raises(Mismatch, match="a feeds Add, expected Mul"):
        single_consumer(t["a"], "Mul")


def _node(op, inputs, out, **attrs):
    o = gs.Variable(out, dtype=F32)
    gs.Node(op, name=out + "_n", inputs=inputs, outputs=[o], attrs=attrs)
    return o


def test_const_value_of_initializers_constant_nodes_and_identity():
    init = gs.Constant("w", np.arange(3, dtype=F32))
    assert const_value(init).tolist() == [0, 1, 2]
    # the legacy exporter shares weights through Identity
    assert const_value(_node("Identity", [init], "shared")).tolist() == [0, 1, 2]
    assert const_value(_node("Constant", [], "c1", value=gs.Constant("v", np.array([4.0], F32)))).tolist() == [4.0]
    assert float(const_value(_node("Constant", [], "c2", value_float=2.5))) == 2.5
    assert const_value(_node("Constant", [], "c3", value_ints=[1, 2])).tolist() == [1, 2]
    assert const_value(gs.Variable("x", dtype=F32)) is None
    assert const_value(_node("Relu", [init], "r")) is None


def _scale_chain(head_dim, static=True):
    """The legacy exporter's scale: 1 / sqrt(sqrt(float(Shape(q)[-1])))."""
    q = gs.Variable("q", dtype=F32, shape=[2, 8, 64, head_dim if static else "d"])
    shape = gs.Variable("q_shape", dtype=np.int64)
    gs.Node("Shape", inputs=[q], outputs=[shape])
    last = _node("Gather", [shape, gs.Constant("idx", np.array(-1, np.int64))], "hd")
    as_f = _node("Cast", [last], "hd_f", to=1)  # FLOAT
    root = _node("Sqrt", [_node("Sqrt", [as_f], "s1")], "s2")
    return _node("Div", [gs.Constant("one", np.array(1.0, F32)), root], "scale")


def test_eval_small_folds_the_legacy_scale_chain_from_static_dims():
    assert scalar(_scale_chain(40)) == pytest.approx(40 ** -0.25, rel=1e-6)


def test_eval_small_gives_up_on_a_symbolic_dim():
    assert eval_small(_scale_chain(40, static=False)) is None
    assert scalar(_scale_chain(40, static=False)) is None


def test_eval_small_slice_concat_and_squeeze():
    x = gs.Variable("x", dtype=F32, shape=[2, 77, 8, 40])
    shape = gs.Variable("shape", dtype=np.int64)
    gs.Node("Shape", inputs=[x], outputs=[shape])
    c = lambda name, v: gs.Constant(name, np.array(v, np.int64))  # noqa: E731
    tail = _node("Slice", [shape, c("st", [2]), c("en", [4])], "tail")
    assert eval_small(tail).tolist() == [8, 40]
    cat = _node("Concat", [c("m1", [-1]), tail], "target", axis=0)
    assert eval_small(cat).tolist() == [-1, 8, 40]
    one = _node("Squeeze", [c("single", [7])], "sq")
    assert eval_small(one).shape == () and int(eval_small(one)) == 7
    # a Gather of a symbolic dim is not known
    y = gs.Variable("y", dtype=F32, shape=["batch", 4])
    yshape = gs.Variable("yshape", dtype=np.int64)
    gs.Node("Shape", inputs=[y], outputs=[yshape])
    assert eval_small(_node("Gather", [yshape, c("i0", 0)], "b")) is None


def test_scalar_rejects_tensors_with_more_than_one_element():
    assert scalar(gs.Constant("v", np.array([1.0, 2.0], F32))) is None
    assert scalar(gs.Constant("s", np.array([[3.0]], F32))) == 3.0


def test_dims_marks_symbolic_dims_none():
    assert dims(gs.Variable("a", dtype=F32, shape=[1, "seq", 768])) == [1, None, 768]
    assert dims(gs.Variable("b", dtype=F32)) is None


def test_skip_identity_casts_walks_same_dtype_casts_and_rejects_others():
    src = gs.Variable("src", dtype=F32, shape=[2])
    mid = _node("Cast", [src], "up1", to=1)
    top = _node("Cast", [mid], "up2", to=1)
    t, walked = skip_identity_casts(top)
    assert t is src and [n.outputs[0].name for n in walked] == ["up2", "up1"]
    # no Cast: the tensor itself
    assert skip_identity_casts(src) == (src, [])
    half = gs.Variable("half", dtype=np.float16, shape=[2])
    widened = gs.Variable("wide", dtype=F32, shape=[2])
    gs.Node("Cast", name="widen", inputs=[half], outputs=[widened], attrs={"to": 1})
    with pytest.raises(Mismatch, match="Cast widen changes dtype"):
        skip_identity_casts(widened)
