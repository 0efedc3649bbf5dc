"""fold and cse on small graphs: what fires, what must not, and the size guard."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from sdgraph.ir import runtime
from sdgraph.ir.model import Model
from sdgraph.passes import PassManager


def _model(nodes, inits, inputs, outputs):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return Model.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def test_fold_shape_chain_to_constant_and_keeps_numbers():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [6, 4])
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i0"], ["d0"], axis=0),
        helper.make_node("Gather", ["s", "i1"], ["d1"], axis=0),
        helper.make_node("Mul", ["d0", "d1"], ["d01"]),
        helper.make_node("Unsqueeze", ["d01", "ax"], ["d01u"]),
        helper.make_node("Concat", ["d01u", "m1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array(0, np.int64), "i0"), numpy_helper.from_array(np.array(1, np.int64), "i1"),
             numpy_helper.from_array(np.array([0], np.int64), "ax"), numpy_helper.from_array(np.array([-1], np.int64), "m1")]
    m = _model(nodes, inits, [x], [y])
    ref = runtime.run(m, seed=2)
    rep = PassManager("fold", verify=True).run(m)
    assert m.op_histogram() == {"Reshape": 1}
    assert rep.records[0].stats["shape_folded"] == 1 and rep.records[0].stats["folded"] == 5
    shape_const = m.graph.nodes[0].inputs[1]
    assert list(shape_const.values) == [6, -1]
    np.testing.assert_array_equal(runtime.run(m, seed=2)["y"], ref["y"])


def test_fold_does_not_fire_on_dynamic_shapes_or_random_ops():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, [2])
    r = helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 2])
    nodes = [helper.make_node("Shape", ["x"], ["y"]), helper.make_node("RandomNormal", [], ["r"], shape=[2, 2])]
    m = _model(nodes, [], [x], [y, r])
    rep = PassManager("fold").run(m)
    assert rep.records[0].modified is False
    assert m.op_histogram() == {"Shape": 1, "RandomNormal": 1}


def test_fold_size_guard_skips_tile_of_weights():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 64])
    w = numpy_helper.from_array(np.ones((1, 64), np.float32), "w")
    reps = numpy_helper.from_array(np.array([64, 1], np.int64), "reps")
    nodes = [helper.make_node("Tile", ["w", "reps"], ["wt"]), helper.make_node("Add", ["x", "wt"], ["y"])]
    m = _model(nodes, [w, reps], [x], [y])
    rep = PassManager("fold").run(m)
    assert rep.records[0].stats.get("skipped_growth") == 1
    assert m.op_histogram()["Tile"] == 1
    # allowing growth explicitly folds it
    m2 = _model(nodes, [w, reps], [x], [y])
    PassManager("fold{max_growth=100000}").run(m2)
    assert "Tile" not in m2.op_histogram()


def test_fold_does_not_duplicate_shared_weight():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 32])
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "wt"], ["a"]),
        helper.make_node("MatMul", ["x", "w"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    m = _model(nodes, [w], [x], [y])
    PassManager("fold").run(m)
    assert m.op_histogram()["Transpose"] == 1  # folding would store W twice
    nodes_single = nodes[:2] + [helper.make_node("Identity", ["a"], ["y"])]
    m2 = _model(nodes_single, [w], [x], [y])
    PassManager("fold", verify=True).run(m2)
    assert "Transpose" not in m2.op_histogram()


def test_dead_code_removed_graph_inputs_kept():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    unused = helper.make_tensor_value_info("unused", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    nodes = [helper.make_node("Relu", ["x"], ["dead"]), helper.make_node("Neg", ["x"], ["y"])]
    m = _model(nodes, [], [x, unused], [y])
    rep = PassManager("fold").run(m)
    assert rep.records[0].stats["nodes_removed"] == 1
    assert [t.name for t in m.graph.inputs] == ["x", "unused"]


def test_cse_merges_equal_small_constants_not_graph_outputs():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 4])
    c1 = numpy_helper.from_array(np.array([2.0], np.float32), "c1")
    c2 = numpy_helper.from_array(np.array([2.0], np.float32), "c2")
    c3 = numpy_helper.from_array(np.array([3.0], np.float32), "c3")
    nodes = [
        helper.make_node("Mul", ["x", "c1"], ["a"]), helper.make_node("Mul", ["x", "c2"], ["b"]),
        helper.make_node("Mul", ["x", "c3"], ["c"]),  # different constant: must stay
        helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Add", ["s", "c"], ["y"]),
        helper.make_node("Add", ["s", "c"], ["z"]),  # same as y but a graph output: kept
    ]
    m = _model(nodes, [c1, c2, c3], [x], [y, z])
    rep = PassManager("cse", verify=True).run(m)
    assert rep.records[0].stats == {"merged": 1}
    assert m.op_histogram() == {"Mul": 2, "Add": 3}


def test_check_and_infer_passes():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    m = _model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Transpose", ["r"], ["y"], perm=[1, 0])], [], [x], [y])
    rep = PassManager("infer,check").run(m)
    assert rep.records[0].stats["shapes_updated"] >= 1
    assert list(m.graph.outputs[0].shape) == [3, 2]
    assert rep.records[1].stats["valid"] is True


def test_simplify_pass_runs_onnxsim_and_keeps_numbers():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    c = numpy_helper.from_array(np.array([1.5], np.float32), "c")
    nodes = [
        helper.make_node("Identity", ["x"], ["i1"]),
        helper.make_node("Identity", ["i1"], ["i2"]),
        helper.make_node("Mul", ["c", "c"], ["c2"]),
        helper.make_node("Mul", ["i2", "c2"], ["y"]),
    ]
    m = _model(nodes, [c], [x], [y])
    rep = PassManager("simplify", verify=True).run(m)
    assert rep.records[0].stats["nodes_removed"] == 3
    assert m.op_histogram() == {"Mul": 1}
    assert rep.records[0].numbers["max_rel"] == 0.0
