"""--verify when a pass's output does not load or run in ONNX Runtime: roll back, name the pass and ORT's message, exit 1."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import parser

from sdgraph.errors import InputError, VerificationError
from sdgraph.ir.model import Model
from sdgraph.passes import Pass, PassManager, PassResult

GRAPH = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,4] x) => (float[4,4] y) {
  w = Constant<value = float[4,4] {1,0,0,0, 0,1,0,0, 0,0,1,0, 0,0,0,1}>()
  h = MatMul(x, w)
  s = Constant<value = int64[2] {4, 2}>()
  r = Reshape(h, s)
  t = Transpose<perm=[1,0]>(r)
  y = MatMul(r, t)
}"""


class WrongWeight(Pass):
    """Loads nowhere: the MatMul weight gets an incompatible shape (ORT's shape inference refuses at load)."""

    name = "test-wrong-weight"
    summary = "breaks loading"

    def run(self, model):
        mm = next(n for n in model.graph.nodes if n.op == "MatMul")
        mm.inputs[1] = gs.Constant("w3", np.ones((3, 4), np.float32))
        return PassResult(True)


class WrongReshape(Pass):
    """Loads, fails when run: the Reshape target comes through an Identity, so only the kernel sees 3x3."""

    name = "test-wrong-reshape"
    summary = "breaks running"
    exact = False

    def run(self, model):
        rs = next(n for n in model.graph.nodes if n.op == "Reshape")
        v = gs.Variable("bad_shape", np.int64, [2])
        model.graph.nodes.append(gs.Node("Identity", "bad_id", inputs=[gs.Constant("s33", np.array([3, 3], np.int64))],
                                         outputs=[v]))
        rs.inputs[1] = v
        return PassResult(True)


def _model() -> Model:
    return Model.from_proto(parser.parse_model(GRAPH))


@pytest.mark.parametrize("bad,what", [(WrongWeight, "ONNX Runtime cannot load"), (WrongReshape, "cannot be reshaped")])
def test_verify_rolls_back_a_graph_ort_refuses(bad, what):
    m = _model()
    before = m.to_proto().SerializeToString()
    with pytest.raises(VerificationError) as info:
        PassManager(["fold", bad()], verify=True).run(m)
    msg = str(info.value)
    assert info.value.exit_code == 1 and "\n" not in msg
    assert msg.startswith(f"pass 2 '{bad.name}' failed and was rolled back: the graph no longer runs:"), msg
    assert what in msg and msg.endswith("(passes before it: fold)"), msg
    # rolled back to the graph after fold, which still runs
    from sdgraph.ir import runtime as rt

    assert rt.run(m, {"x": np.ones((2, 4), np.float32)})["y"].shape == (4, 4)
    assert m.to_proto().SerializeToString() != before  # fold did apply


def test_without_verify_the_bad_graph_is_written_but_verify_input_must_run():
    m = _model()
    PassManager([WrongReshape()]).run(m)  # no --verify: nothing runs the graph
    with pytest.raises(InputError, match="does not run in ONNX Runtime before any pass"):
        PassManager(["fold"], verify=True).run(m)
