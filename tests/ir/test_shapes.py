"""sdgraph.ir.shapes: inference writes shapes onto the graph, in memory and path-based; static_shape."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from sdgraph.ir import shapes
from sdgraph.ir.model import Model
from tests.graphs import ADD_MUL, mlp_model, save_external


def _forget_shapes(m: Model) -> list[str]:
    names = []
    for t in m.graph.tensors().values():
        if isinstance(t, gs.Variable) and t not in m.graph.inputs:
            t.shape = None
            names.append(t.name)
    return names


def test_infer_shapes_fills_every_intermediate_tensor():
    m = Model.from_onnx_text(ADD_MUL)
    forgotten = _forget_shapes(m)
    changed = shapes.infer_shapes(m)
    t = m.graph.tensors()
    assert changed == len(forgotten) == 5
    assert [t[n].shape for n in ("a", "b", "y")] == [[2, 4]] * 3
    assert t["c"].shape == [1]
    # a second run has nothing left to change
    assert shapes.infer_shapes(m) == 0


def test_path_based_inference_over_the_limit_keeps_weights_on_disk(tmp_path, monkeypatch):
    src = save_external(mlp_model(hidden=256), tmp_path / "in" / "model.onnx")
    data_before = (tmp_path / "in" / "model.onnx_data").read_bytes()
    m = Model.load(src)
    _forget_shapes(m)
    monkeypatch.setattr(shapes, "_PROTO_LIMIT", 0)  # force the file-based branch
    assert shapes.infer_shapes(m) == 4
    t = m.graph.tensors()
    assert t["h"].shape == [1, 256] and t["o"].shape == [1, 16]
    assert (tmp_path / "in" / "model.onnx_data").read_bytes() == data_before


def test_failed_inference_changes_nothing(monkeypatch):
    m = Model.from_onnx_text(ADD_MUL)
    _forget_shapes(m)

    def broken(*a, **k):
        raise RuntimeError("inference exploded\nsecond line")

    monkeypatch.setattr(shapes.onnx.shape_inference, "infer_shapes", broken)
    assert shapes.infer_shapes(m) == 0
    assert m.graph.tensors()["y"].shape is None


def test_static_shape():
    assert shapes.static_shape(gs.Variable("a", shape=[1, 4, np.int64(8)])) == (1, 4, 8)
    assert shapes.static_shape(gs.Variable("b", shape=[1, "h", 8])) is None
    assert shapes.static_shape(gs.Variable("c", shape=[1, -1])) is None
    assert shapes.static_shape(gs.Variable("d")) is None
