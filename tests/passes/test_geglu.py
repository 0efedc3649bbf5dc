"""geglu: the GEGLU gate fused on small graphs (Split and Slice forms); cases it must leave alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdgraph.ir import runtime
from sdgraph.ir.model import CANONICAL_DOMAIN, Model
from sdgraph.passes.manager import PassManager


def _geglu_model(split="slice", swap=False, erf_scale=math.sqrt(2.0), half_first=False):
    c = lambda n, v, dt=np.int64: numpy_helper.from_array(np.array(v, dtype=dt), n)  # noqa: E731
    inits = [c("s2", erf_scale, np.float32), c("one", 1.0, np.float32), c("half", 0.5, np.float32),
             c("z", [0]), c("m", [8]), c("e", [16]), c("ax", [-1]), c("sz", [8, 8])]
    if split == "slice":
        nodes = [helper.make_node("Slice", ["x", "z", "m", "ax"], ["h"]), helper.make_node("Slice", ["x", "m", "e", "ax"], ["g"])]
    else:
        nodes = [helper.make_node("Split", ["x", "sz"], ["h", "g"], axis=-1)]
    gate, hid = ("h", "g") if swap else ("g", "h")  # swapped: gelu on the first half, not GEGLU
    nodes += [helper.make_node("Div", [gate, "s2"], ["d"]), helper.make_node("Erf", ["d"], ["er"]),
              helper.make_node("Add", ["er", "one"], ["a"])]
    if half_first:
        nodes += [helper.make_node("Mul", [gate, "half"], ["gh"]), helper.make_node("Mul", ["gh", "a"], ["gelu"])]
    else:
        nodes += [helper.make_node("Mul", [gate, "a"], ["ga"]), helper.make_node("Mul", ["ga", "half"], ["gelu"])]
    nodes.append(helper.make_node("Mul", [hid, "gelu"], ["y"]))
    g = helper.make_graph(nodes, "geglu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return Model.from_proto(m)


def _run(m):
    ref = runtime.run(m, seed=0)
    rec = PassManager("geglu", debug=True).run(m).records[0]
    return rec, runtime.worst(runtime.compare(ref, runtime.run(m, seed=0)))


@pytest.mark.parametrize("split", ["slice", "split"])
@pytest.mark.parametrize("half_first", [False, True])
def test_fuses(split, half_first):
    m = _geglu_model(split=split, half_first=half_first)
    rec, err = _run(m)
    assert (rec.expected, rec.matched) == (1, 1)
    hist = m.op_histogram()
    assert hist[f"{CANONICAL_DOMAIN}::GeGLU"] == 1 and hist["Erf"] == 0 and len(m.graph.nodes) == 1
    assert err["max_rel"] <= 1e-5


@pytest.mark.parametrize(("kwargs", "reason"), [({"swap": True}, "halves"), ({"erf_scale": 1.702}, "not 1/√2")])
def test_does_not_fire(kwargs, reason):
    m = _geglu_model(**kwargs)
    rec, err = _run(m)
    assert (rec.expected, rec.matched) == (1, 0)
    assert reason in rec.near_misses[0][1] and m.op_histogram()["Erf"] == 1 and err["max_abs"] == 0
