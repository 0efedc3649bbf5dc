"""The torch emitter's converters, family by family, on small graphs: output equals ONNX Runtime's.

The backend node cases (test_torch_emitter.py) cover each op alone; these cover the families on
graphs as SD exports write them (shape arithmetic chains, dynamic dims, canonical ops) and the
support checks' reasons.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from sdgraph.errors import UnsupportedError  # noqa: E402
from sdgraph.ir import canonical  # noqa: E402
from sdgraph.ir import runtime as rt  # noqa: E402
from sdgraph.ir.model import CANONICAL_DOMAIN, Model  # noqa: E402
from sdgraph.targets.torch_fx import CANONICAL_NATIVE, CONVERTERS, SUPPORTED_OPS, converter, emit, unsupported_nodes  # noqa: E402
from sdgraph.targets.torch_fx import shape_math  # noqa: E402

_NP = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64, np.dtype(np.bool_): TensorProto.BOOL}
RNG = np.random.default_rng(0)


def _model(nodes, inputs: dict, outputs: dict, inits: dict | None = None, opset: int = 17, functions=(), dims=None) -> Model:
    """A one-graph model; ``inputs`` name -> example array (``dims`` name -> symbolic shape), ``outputs`` name -> dtype."""
    dims = dims or {}
    vi = [helper.make_tensor_value_info(n, _NP[a.dtype], dims.get(n, list(a.shape))) for n, a in inputs.items()]
    vo = [helper.make_tensor_value_info(n, dt, None) for n, dt in outputs.items()]
    init = [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()]
    graph = helper.make_graph(nodes, "g", vi, vo, init)
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(CANONICAL_DOMAIN, 1)] if functions else [])
    proto = helper.make_model(graph, opset_imports=opsets, functions=list(functions), ir_version=9)
    return Model.from_proto(proto)


def _same_as_ort(model: Model, *feeds_list: dict, rtol=1e-4, atol=1e-5):
    assert unsupported_nodes(model) == []
    gm = emit(model)
    for feeds in feeds_list:
        want = rt.run(model, feeds)
        got = gm(*[torch.from_numpy(feeds[t.name]) for t in model.graph.inputs])
        for (name, w), g in zip(want.items(), got):
            g = g.detach().numpy()
            assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype, w.dtype)
            np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=rtol, atol=atol, err_msg=name)
    return gm


def _f(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def test_table_one_converter_per_op_with_family():
    assert "Conv" in SUPPORTED_OPS and CANONICAL_NATIVE == {"Attention", "AttentionMasked", "GroupNorm", "GroupNormSilu", "GeGLU"}
    families = {c.family for c in CONVERTERS.values()}
    assert families == {"elementwise", "matmul", "conv", "norm", "reduce", "shape_ops", "spatial", "canonical"}
    assert CONVERTERS[("", "Relu")] is CONVERTERS[("", "Tanh")]  # one converter for the unary family
    with pytest.raises(RuntimeError, match="two torch converters"):
        converter("Relu")(lambda em, x: [])


def test_elementwise_family():
    x, y = _f(2, 3, 4), _f(3, 4)
    nodes = [
        helper.make_node("Add", ["x", "y"], ["a"]),
        helper.make_node("Mul", ["a", "x"], ["m"]),
        helper.make_node("Div", ["m", "two"], ["d"]),
        helper.make_node("Tanh", ["d"], ["g"]),
        helper.make_node("Greater", ["g", "zero"], ["c"]),
        helper.make_node("Where", ["c", "g", "y"], ["w"]),
        helper.make_node("Clip", ["w", "lo", "hi"], ["cl"]),
        helper.make_node("HardSigmoid", ["cl"], ["hs"], alpha=0.3, beta=0.4),
        helper.make_node("LeakyRelu", ["hs"], ["lr"], alpha=0.1),
        helper.make_node("Cast", ["c"], ["ci"], to=TensorProto.INT64),
        helper.make_node("Mod", ["ci", "three"], ["mi"]),
        helper.make_node("Div", ["ki", "three"], ["di"]),  # integer Div truncates toward zero
        helper.make_node("Max", ["lr", "x", "m"], ["mx"]),
    ]
    inits = {"two": np.float32(2), "zero": np.float32(0), "lo": np.float32(-0.5), "hi": np.float32(0.5),
             "three": np.int64(3), "ki": np.array([-7, -1, 5, 8], np.int64)}
    m = _model(nodes, {"x": x, "y": y}, {"lr": TensorProto.FLOAT, "mi": TensorProto.INT64, "di": TensorProto.INT64,
                                         "mx": TensorProto.FLOAT}, inits)
    _same_as_ort(m, {"x": x, "y": y})


def test_matmul_family():
    x = _f(2, 5, 8)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Reshape", ["h", "flat"], ["h2"]),
        helper.make_node("Gemm", ["h2", "wt", "b"], ["g"], transB=1, alpha=0.5, beta=2.0),
        helper.make_node("Einsum", ["x", "x"], ["e"], equation="bij,bkj->bik"),
    ]
    inits = {"w": _f(8, 6), "flat": np.array([10, 6], np.int64), "wt": _f(4, 6), "b": _f(4)}
    _same_as_ort(_model(nodes, {"x": x}, {"g": TensorProto.FLOAT, "e": TensorProto.FLOAT}, inits), {"x": x})


def test_conv_family_and_its_check():
    x = _f(1, 4, 9, 9)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[0, 1, 2, 1], strides=[2, 1], dilations=[1, 2]),
        helper.make_node("Conv", ["c", "wg"], ["d"], group=2, pads=[1, 1, 1, 1]),
    ]
    inits = {"w": _f(6, 4, 3, 3), "b": _f(6), "wg": _f(4, 3, 3, 3)}
    _same_as_ort(_model(nodes, {"x": x}, {"d": TensorProto.FLOAT}, inits), {"x": x})
    auto = _model([helper.make_node("Conv", ["x", "w"], ["c"], auto_pad="SAME_UPPER", name="conv_same")], {"x": x},
                  {"c": TensorProto.FLOAT}, {"w": _f(6, 4, 3, 3)})
    assert unsupported_nodes(auto) == [("conv_same", "Conv", "auto_pad=SAME_UPPER not mapped (pads only)")]


def test_norm_family():
    x = _f(2, 8, 5, 5)
    nodes = [
        helper.make_node("InstanceNormalization", ["x", "s8", "b8"], ["i"], epsilon=1e-3),
        helper.make_node("GroupNormalization", ["i", "s4", "b4"], ["g"], num_groups=4),
        helper.make_node("LayerNormalization", ["g", "s5", "b5"], ["l"], axis=-1),
        helper.make_node("Softmax", ["l"], ["sm"], axis=1),
        helper.make_node("LogSoftmax", ["sm"], ["ls"], axis=-1),
    ]
    inits = {"s8": _f(8), "b8": _f(8), "s4": _f(4), "b4": _f(4), "s5": _f(5), "b5": _f(5)}
    _same_as_ort(_model(nodes, {"x": x}, {"ls": TensorProto.FLOAT}, inits, opset=18), {"x": x})


def test_reduce_family():
    x = _f(3, 4, 5)
    nodes = [
        helper.make_node("ReduceMean", ["x", "ax"], ["m"], keepdims=1),
        helper.make_node("ReduceSum", ["x", "ax2"], ["s"], keepdims=0),
        helper.make_node("ReduceMax", ["x", "ax3"], ["mx"], keepdims=0),
        helper.make_node("ArgMax", ["x"], ["am"], axis=1, select_last_index=1),
        helper.make_node("CumSum", ["x", "one"], ["cs"], reverse=1, exclusive=1),
    ]
    inits = {"ax": np.array([-1], np.int64), "ax2": np.array([0, 1], np.int64), "ax3": np.array([0, 2], np.int64),
             "one": np.array(1, np.int64)}
    outs = {"m": TensorProto.FLOAT, "s": TensorProto.FLOAT, "mx": TensorProto.FLOAT, "am": TensorProto.INT64, "cs": TensorProto.FLOAT}
    _same_as_ort(_model(nodes, {"x": x}, outs, inits, opset=18), {"x": x})


def test_shape_ops_keep_shape_arithmetic_in_python():
    """Shape -> Gather -> Div -> Concat -> Reshape as SD exports write it, on a dynamic batch and length."""
    nodes = [
        helper.make_node("Shape", ["x"], ["sh"]),
        helper.make_node("Gather", ["sh", "i0"], ["b"], axis=0),
        helper.make_node("Gather", ["sh", "i1"], ["n"], axis=0),
        helper.make_node("Div", ["n", "two"], ["half"]),
        helper.make_node("Unsqueeze", ["b", "a0"], ["bu"]),
        helper.make_node("Unsqueeze", ["half", "a0"], ["hu"]),
        helper.make_node("Concat", ["bu", "two1", "hu", "c8"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["r"]),
        helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1, 3]),
        helper.make_node("Split", ["t", "sizes"], ["s1", "s2"], axis=-1),
        helper.make_node("Slice", ["s2", "st", "en", "ax", "stp"], ["sl"]),
        helper.make_node("Expand", ["sl", "shape_e"], ["e"]),
        helper.make_node("Flatten", ["e"], ["f"], axis=2),
        helper.make_node("Squeeze", ["unit", "a0"], ["sq"]),
        helper.make_node("Add", ["f", "sq"], ["out"]),
    ]
    inits = {"i0": np.array(0, np.int64), "i1": np.array(1, np.int64), "two": np.array(2, np.int64),
             "a0": np.array([0], np.int64), "two1": np.array([2], np.int64), "c8": np.array([8], np.int64),
             "sizes": np.array([3, 5], np.int64), "st": np.array([4], np.int64), "en": np.array([0], np.int64),
             "ax": np.array([3], np.int64), "stp": np.array([-2], np.int64), "shape_e": np.array([1, 1, 1, 1], np.int64),
             "unit": np.ones((1, 1), np.float32)}
    x = _f(2, 6, 8)
    m = _model(nodes, {"x": x}, {"out": TensorProto.FLOAT}, inits, dims={"x": ["batch", "seq", 8]})
    gm = _same_as_ort(m, {"x": x}, {"x": _f(3, 10, 8)})
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert shape_math.as_tensor not in targets  # no shape value became a tensor
    assert shape_math.s_idiv in targets and shape_math.s_concat in targets


def test_spatial_family_and_resize_check():
    x = _f(1, 3, 4, 5)
    nodes = [
        helper.make_node("Resize", ["x", "", "sc"], ["n"], mode="nearest", coordinate_transformation_mode="asymmetric",
                         nearest_mode="floor"),
        helper.make_node("Resize", ["n", "", "", "sz"], ["l"], mode="linear", coordinate_transformation_mode="half_pixel"),
        helper.make_node("Pad", ["l", "pads"], ["p"], mode="reflect"),
        helper.make_node("Pad", ["p", "pads", "val"], ["pc"], mode="constant"),
    ]
    inits = {"sc": np.array([1, 1, 2, 2], np.float32), "sz": np.array([1, 3, 6, 7], np.int64),
             "pads": np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64), "val": np.array(0.5, np.float32)}
    _same_as_ort(_model(nodes, {"x": x}, {"pc": TensorProto.FLOAT}, inits), {"x": x})
    cubic = _model([helper.make_node("Resize", ["x", "", "sc"], ["y"], mode="cubic", name="up")], {"x": x},
                   {"y": TensorProto.FLOAT}, {"sc": np.array([1, 1, 2, 2], np.float32)})
    assert unsupported_nodes(cubic) == [("up", "Resize", "cubic resize not mapped")]
    wrap = _model([helper.make_node("Pad", ["x", "pads"], ["y"], mode="wrap", name="pw")], {"x": x},
                  {"y": TensorProto.FLOAT}, {"pads": inits["pads"]})
    assert unsupported_nodes(wrap) == [("pw", "Pad", "pad mode wrap not mapped (constant, reflect, edge)")]


def test_canonical_family_matches_the_function_bodies():
    q, k, v = _f(2, 2, 6, 4), _f(2, 2, 5, 4), _f(2, 2, 5, 4)
    x = _f(2, 8, 3, 3)
    h = _f(2, 6, 10)
    nodes = [
        helper.make_node("Attention", ["q", "k", "v"], ["att"], domain=CANONICAL_DOMAIN, scale=0.3, num_heads=2),
        helper.make_node("GroupNormSilu", ["x", "gamma", "beta"], ["gn"], domain=CANONICAL_DOMAIN, groups=4, epsilon=1e-5),
        helper.make_node("GeGLU", ["h"], ["gg"], domain=CANONICAL_DOMAIN),
    ]
    fns = [canonical.function_proto(n, 17) for n in ("Attention", "GroupNormSilu", "GeGLU")]
    inits = {"gamma": _f(8, 1, 1), "beta": _f(8, 1, 1)}
    m = _model(nodes, {"q": q, "k": k, "v": v, "x": x, "h": h},
               {"att": TensorProto.FLOAT, "gn": TensorProto.FLOAT, "gg": TensorProto.FLOAT}, inits, functions=fns)
    gm = _same_as_ort(m, {"q": q, "k": k, "v": v, "x": x, "h": h})
    fns_called = {getattr(n.target, "__name__", "") for n in gm.graph.nodes if n.op == "call_function"}
    assert {"_sdpa", "_group_norm", "_geglu"} <= fns_called  # mapped natively, not through the bodies


def test_unsupported_op_is_named_with_reason(tmp_path):
    x = _f(2, 3)
    m = _model([helper.make_node("Hardmax", ["x"], ["h"], name="hm"), helper.make_node("Relu", ["h"], ["y"], name="ok")],
               {"x": x}, {"y": TensorProto.FLOAT})
    assert unsupported_nodes(m) == [("hm", "Hardmax", "no torch converter for this op")]
    with pytest.raises(UnsupportedError) as info:
        emit(m)
    assert info.value.problems == ["hm (Hardmax): no torch converter for this op"]
    path = tmp_path / "m.onnx"
    onnx.save(m.to_proto(), path)
    res = subprocess.run([sys.executable, "-m", "sdgraph", "lower", str(path), "--target", "torch", "-o", str(tmp_path / "out"),
                          "--option", "mode=eager", "--no-cache"], capture_output=True, text=True)
    assert res.returncode == 4, res.stderr
    assert "Traceback" not in res.stderr and "KeyError" not in res.stderr
    assert any("hm" in ln and "Hardmax" in ln and "no torch converter" in ln for ln in res.stderr.splitlines()), res.stderr
    assert sum(ln.startswith("error:") for ln in res.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()
