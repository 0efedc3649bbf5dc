"""gn: GroupNorm (+ SiLU) fused on small graphs and tiny exports; cases it must leave alone."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdgraph.ir import runtime
from sdgraph.ir.model import CANONICAL_DOMAIN, Model
from sdgraph.passes.manager import PassManager


def _gn_model(silu=True, in_scale=1.0, gamma_shape=(8, 1, 1), groups=4, extra_sigmoid_use=False):
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array([0, groups, -1], dtype=np.int64), "gshape"),
        numpy_helper.from_array(np.full(groups, in_scale, dtype=np.float32), "ones"),
        numpy_helper.from_array(np.zeros(groups, dtype=np.float32), "zeros"),
        numpy_helper.from_array(rng.standard_normal(gamma_shape).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.standard_normal((8, 1, 1)).astype(np.float32), "beta"),
    ]
    nodes = [
        helper.make_node("Reshape", ["x", "gshape"], ["xg"]),
        helper.make_node("InstanceNormalization", ["xg", "ones", "zeros"], ["n"], epsilon=1e-6),
        helper.make_node("Shape", ["x"], ["xs"]),
        helper.make_node("Reshape", ["n", "xs"], ["nr"]),
        helper.make_node("Mul", ["nr", "gamma"], ["sc"]),
        helper.make_node("Add", ["sc", "beta"], ["pre"]),
    ]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 4, 4])]
    if silu:
        nodes += [helper.make_node("Sigmoid", ["pre"], ["sg"]), helper.make_node("Mul", ["pre", "sg"], ["y"])]
        if extra_sigmoid_use:
            nodes.append(helper.make_node("Identity", ["sg"], ["sg_out"]))
            outs.append(helper.make_tensor_value_info("sg_out", TensorProto.FLOAT, [1, 8, 4, 4]))
    else:
        nodes.append(helper.make_node("Identity", ["pre"], ["y"]))
    g = helper.make_graph(nodes, "gn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4, 4])], outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return Model.from_proto(m)


def _run(m, spec="gn"):
    ref = runtime.run(m, seed=0)
    rep = PassManager(spec, debug=True).run(m)
    return rep.records[0], runtime.worst(runtime.compare(ref, runtime.run(m, seed=0)))


@pytest.mark.parametrize("silu", [True, False])
def test_fuses_with_and_without_silu(silu):
    m = _gn_model(silu=silu)
    rec, err = _run(m)
    assert (rec.expected, rec.matched) == (1, 1)
    assert rec.stats == {"groupnorm_fused": 1, "with_silu": int(silu)}
    hist = m.op_histogram()
    assert hist[f"{CANONICAL_DOMAIN}::{'GroupNormSilu' if silu else 'GroupNorm'}"] == 1
    assert hist["InstanceNormalization"] == 0 and hist["Sigmoid"] == 0
    node = next(n for n in m.graph.nodes if n.domain == CANONICAL_DOMAIN)
    assert node.attrs == {"groups": 4, "epsilon": pytest.approx(1e-6)}
    assert err["max_rel"] <= 1e-5


def test_silu_option_off_keeps_sigmoid():
    m = _gn_model(silu=True)
    rec, err = _run(m, "gn{silu=false}")
    assert rec.stats["with_silu"] == 0 and m.op_histogram()["Sigmoid"] == 1
    assert err["max_rel"] <= 1e-5


def test_sigmoid_used_elsewhere_is_not_swallowed():
    m = _gn_model(silu=True, extra_sigmoid_use=True)
    rec, err = _run(m)
    assert rec.matched == 1 and rec.stats["with_silu"] == 0
    assert m.op_histogram()["Sigmoid"] == 1 and err["max_rel"] <= 1e-5


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [({"in_scale": 2.0}, "ones/zeros"), ({"gamma_shape": (8, 4, 1)}, "per-channel"), ({"groups": 3}, "groups")],
)
def test_does_not_fire(kwargs, reason):
    m = _gn_model(**kwargs)
    if kwargs.get("groups") == 3:
        # 8 channels do not split into 3 groups: a graph that is not a GroupNorm at all
        m.graph.nodes[0].inputs[1].values = np.array([0, 3, -1], dtype=np.int64)
        rec = PassManager("gn", debug=True).run(m).records[0]
    else:
        rec, _ = _run(m)
    assert (rec.expected, rec.matched) == (1, 0)
    assert reason in rec.near_misses[0][1]
    assert m.op_histogram()["InstanceNormalization"] == 1
