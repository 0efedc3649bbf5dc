"""Small graphs written in code for foundation and pass tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ADD_MUL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,4] x) => (float[2,4] y) {
  c = Constant<value = float[1] {2.0}>()
  d = Mul(c, c)
  a = Mul(x, d)
  b = Mul(x, d)
  y = Add(a, b)
}"""


def mlp_model(hidden: int = 64, seed: int = 0, ir_version: int | None = None) -> onnx.ModelProto:
    """x[1,16] -> MatMul(W1[16,hidden]) -> Relu -> MatMul(W2[hidden,16]) -> y; weights big enough to go external."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((16, hidden)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((hidden, 16)).astype(np.float32), "w2")
    shape_c = numpy_helper.from_array(np.array([1, 16], dtype=np.int64), "shape_c")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["o"], name="mm2"),
        helper.make_node("Reshape", ["o", "shape_c"], ["y"], name="reshape"),
    ]
    g = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        [w1, w2, shape_c],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    if ir_version is not None:
        m.ir_version = ir_version
    return m


def save_external(model: onnx.ModelProto, path: Path, location: str | None = None) -> Path:
    """Save with every weight over 1 KiB in one external file beside the graph."""
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location or path.name + "_data", size_threshold=1024)
    return path
