"""PassManager: structural verifier, numeric verification with rollback, strict, instruments."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from sdgraph.errors import PassError, VerificationError
from sdgraph.ir.model import Model
from sdgraph.passes import Option, Pass, PassManager, PassResult, register
from sdgraph.passes.manager import DumpDir, PrintAfter
from tests.graphs import ADD_MUL


@register
class _Breaker(Pass):
    """Changes the numbers: multiplies the graph output by 1.5 (an 'exact' pass that lies)."""

    name = "test-breaker"
    summary = "test pass that changes outputs"
    options = (Option("approx", bool, False),)

    def run(self, model):
        g = model.graph
        out = g.outputs[0]
        producer = out.inputs[0]
        tmp = gs.Variable(out.name + "_pre", dtype=out.dtype, shape=out.shape)
        producer.outputs[0] = tmp
        g.nodes.append(gs.Node("Mul", inputs=[tmp, gs.Constant("k1_5", np.array(1.5, np.float32))], outputs=[out]))
        return PassResult(True, {"broken": 1})


@register
class _Dangler(Pass):
    name = "test-dangler"
    summary = "test pass that leaves a dangling input"

    def run(self, model):
        node = model.graph.nodes[-1]
        node.inputs[0] = gs.Variable("nobody_makes_me", dtype=np.float32)
        return PassResult(True)


@register
class _Approx(Pass):
    name = "test-approx"
    summary = "approximate test pass"
    exact = False
    options = (Option("min_cosine", float, None),)

    def run(self, model):
        return _Breaker().run(model)


@register
class _Pattern(Pass):
    name = "test-pattern"
    summary = "pattern pass that matches one of two"
    pattern = True

    def run(self, model):
        r = PassResult(False, {"fused": 1}, expected=2, matched=1)
        if self.debug:
            r.near_misses.append(("Mul_7", "scale is not a constant"))
        return r


def _model():
    return Model.from_onnx_text(ADD_MUL)


def test_exact_pass_that_changes_numbers_is_rolled_back_and_named():
    m = _model()
    before = m.op_histogram()
    with pytest.raises(VerificationError) as err:
        PassManager("fold,test-breaker,cse", verify=True).run(m)
    msg = str(err.value)
    assert "pass 2 'test-breaker' failed and was rolled back" in msg
    assert "passes before it: fold" in msg
    assert "max_rel 0.5 " in msg
    # fold's changes stay, the breaker's are gone
    assert m.op_histogram()["Mul"] == before["Mul"] - 1
    assert "k1_5" not in m.graph.tensors()


def test_without_verify_the_broken_pass_goes_through():
    m = _model()
    rep = PassManager("test-breaker").run(m)
    assert rep.records[0].modified and rep.records[0].stats == {"broken": 1}


def test_structural_verifier_catches_dangling_tensor():
    m = _model()
    nodes_before = m.num_nodes()
    with pytest.raises(PassError, match="reads 'nobody_makes_me', which nothing produces"):
        PassManager("test-dangler").run(m)
    assert m.num_nodes() == nodes_before


def test_approximate_pass_reports_numbers_and_fails_only_under_min_cosine():
    rep = PassManager("test-approx", verify=True).run(_model())
    nums = rep.records[0].numbers
    assert nums["max_rel"] == pytest.approx(0.5, rel=1e-6) and nums["cosine"] == pytest.approx(1.0)
    with pytest.raises(VerificationError, match="below min_cosine=1.5"):
        PassManager("test-approx{min_cosine=1.5}", verify=True).run(_model())


def test_strict_fails_on_unmatched_regions_with_near_miss():
    rep = PassManager("test-pattern").run(_model())
    assert (rep.records[0].expected, rep.records[0].matched) == (2, 1)
    with pytest.raises(VerificationError, match=r"matched 1 of 2 expected regions \(first near miss: Mul_7: scale"):
        PassManager("test-pattern", strict=True, debug=True).run(_model())


def test_report_counts_and_canonical_pipeline():
    m = _model()
    rep = PassManager(" fold , cse ,check", verify=True).run(m)
    assert rep.pipeline == "fold,cse,check"
    fold, cse, check = rep.records
    assert fold.stats["folded"] == 2 and fold.nodes_before == 5 and fold.nodes_after == 3
    assert cse.stats == {"merged": 1} and cse.ops_delta == {"Mul": -1}
    assert check.modified is False
    assert rep.ops_before == {"Constant": 1, "Mul": 3, "Add": 1} and rep.ops_after == {"Mul": 1, "Add": 1}
    assert rep.numbers["max_abs"] == 0.0


def test_dump_dir_and_print_after(tmp_path):
    printed = []
    PassManager("fold,cse", instruments=[DumpDir(tmp_path / "d"), PrintAfter(printed.append, ["cse"])]).run(_model())
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["000_input.onnx", "001_fold.onnx", "002_cse.onnx"]
    assert len(printed) == 1 and printed[0].startswith("// after 002 cse") and "Add(" in printed[0]
    assert Model.load(tmp_path / "d" / "002_cse.onnx").num_nodes() == 2


def test_instrument_should_run_skips_a_pass_with_its_reason_and_hooks_run_in_order():
    from sdgraph.passes.instruments import Instrument

    calls = []

    class SkipCse(Instrument):
        def should_run(self, index, p, model):
            return "cse is off today" if p.name == "cse" else None

        def before_pass(self, index, p, model):
            calls.append(("before", p.name))

        def after_run(self, index, p, model, record):
            calls.append(("run", p.name, record.modified))

        def after_pass(self, index, p, model, record):
            calls.append(("after", p.name))

    m = _model()
    rep = PassManager("fold,cse", instruments=[SkipCse()]).run(m)
    fold, cse = rep.records
    assert cse.skipped == "cse is off today" and cse.nodes_after == cse.nodes_before == 3
    assert fold.skipped is None and fold.seconds > 0 and cse.seconds == 0
    assert calls == [("before", "fold"), ("run", "fold", True), ("after", "fold")]
    assert m.op_histogram()["Mul"] == 2  # cse did not run


def test_role_gate_skips_passes_for_other_roles():
    @register
    class _UnetOnly(Pass):
        name = "test-unet-only"
        summary = "applies to UNets only"
        roles = ("unet",)

        def run(self, model):  # pragma: no cover - gated
            raise AssertionError

    rep = PassManager("test-unet-only").run(_model())
    assert rep.records[0].skipped.startswith("applies to unet, not ")
