"""The pass contract in the pass: requires -> run -> result check -> ensures, typed option objects."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from sdgraph.errors import PassError, TargetUnavailable, UsageError
from sdgraph.ir.model import Model
from sdgraph.passes import Option, Pass, PassManager, PassResult, create_pass, register
from sdgraph.passes.base import Options, graph_signature
from tests.graphs import ADD_MUL


def _model() -> Model:
    return Model.from_onnx_text(ADD_MUL)


class _Needs(Pass):
    name = "t-needs"
    summary = "requires a Relu"

    def requires(self, model):
        if not any(n.op == "Relu" for n in model.graph.nodes):
            raise PassError("the graph has no Relu")

    def run(self, model):  # pragma: no cover - requires refuses first
        raise AssertionError("run() must not be reached")


class _Ensures(Pass):
    name = "t-ensures"
    summary = "adds a node, then insists there is none"

    def run(self, model):
        out = model.graph.outputs[0]
        tmp = gs.Variable(out.name + "_pre", dtype=out.dtype)
        out.inputs[0].outputs[0] = tmp
        model.graph.nodes.append(gs.Node("Identity", inputs=[tmp], outputs=[out]))
        return PassResult(True)

    def ensures(self, model):
        if any(n.op == "Identity" for n in model.graph.nodes):
            raise PassError("an Identity is left")


class _Returns(Pass):
    name = "t-returns"
    summary = "returns whatever it was given"

    def __init__(self, value):
        super().__init__()
        self.value = value

    def run(self, model):
        return self.value


class _Liar(Pass):
    name = "t-liar"
    summary = "removes a node but says it modified nothing"

    def run(self, model):
        add = next(n for n in model.graph.nodes if n.op == "Add")
        add.op = "Sub"
        return PassResult(False)


class _Typed(Pass):
    name = "t-typed"
    summary = "every option type"
    options = (
        Option("n", int, 1, positional=True, min=0),
        Option("ratio", float, 0.5),
        Option("flag", bool, False),
        Option("names", list, ["a"]),
        Option("cos", float, None),
    )

    def run(self, model):
        return PassResult(False, {"n": self.opts.n, "names": self.opts.names})


@register
class _TypedReg(_Typed):
    name = "t-typed-reg"


def test_failed_requires_is_a_pass_error_naming_the_pass_and_run_never_starts():
    m = _model()
    with pytest.raises(PassError, match=r"pass 't-needs' cannot run: the graph has no Relu"):
        _Needs()(m)


def test_failed_ensures_is_a_pass_error_naming_the_pass():
    with pytest.raises(PassError, match=r"pass 't-ensures': post-condition failed: an Identity is left"):
        _Ensures()(_model())


@pytest.mark.parametrize("value", [None, True, {"modified": True}])
def test_run_returning_something_else_than_a_pass_result_is_refused(value):
    with pytest.raises(PassError, match=rf"pass 't-returns': run\(\) returned {type(value).__name__}, not PassResult"):
        _Returns(value)(_model())


def test_modified_false_with_a_changed_graph_is_refused():
    with pytest.raises(PassError, match="reported modified=False but changed the graph"):
        _Liar()(_model())


def test_manager_rolls_back_a_contract_failure():
    m = _model()
    before = graph_signature(m)
    with pytest.raises(PassError, match=r"pass 2 't-ensures' failed and was rolled back: .*an Identity is left"):
        PassManager(["fold", _Ensures()]).run(m)
    after = graph_signature(m)
    assert not any(n.op == "Identity" for n in m.graph.nodes)
    assert after != before  # fold's work stays
    assert sum(1 for n in m.graph.nodes if n.op == "Mul") == 2


def test_other_sdgraph_errors_from_requires_keep_their_type():
    class NeedsTool(Pass):
        name = "t-tool"
        summary = "needs a missing tool"

        def requires(self, model):
            raise TargetUnavailable("needs sometool: pip install sometool")

    with pytest.raises(TargetUnavailable, match="needs sometool"):
        NeedsTool()(_model())


def test_call_names_new_nodes_and_returns_the_result():
    m = _model()
    res = _Ensures().run(m)  # run alone: no contract, the node stays unnamed
    assert res.modified and any(n.op == "Identity" and not n.name for n in m.graph.nodes)

    class Named(_Ensures):
        name = "t-named"

        def ensures(self, model):
            assert all(n.name for n in model.graph.nodes)

    m2 = _model()
    assert Named()(m2).modified
    names = [n.name for n in m2.graph.nodes]
    assert len(set(names)) == len(names) and all(x.startswith("t-named_") for x in names)


def test_option_object_is_typed_frozen_and_per_pass():
    p = create_pass("t-typed-reg", 3, {"ratio": "0.25", "names": "x|y", "flag": "yes"})
    o = p.opts
    assert isinstance(o, Options) and type(o).__name__ == "_TypedRegOptions"
    assert (o.n, o.ratio, o.flag, o.names, o.cos) == (3, 0.25, True, ("x", "y"), None)
    assert {f.name: f.type for f in dataclasses.fields(o)} == {
        "n": int, "ratio": float, "flag": bool, "names": tuple[str, ...], "cos": float | None,
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.ratio = 0.9
    # defaults are frozen too, and the class's declaration is untouched
    d = _Typed().opts
    assert d.names == ("a",) and _Typed.options[3].default == ["a"]
    assert _Typed()(_model()).stats == {"n": 1, "names": ("a",)}


def test_option_values_are_checked_and_unknown_options_refused():
    with pytest.raises(UsageError, match=r"pass 't-typed' has no option 'ratoi' \(options: n, ratio, flag, names, cos\)"):
        _Typed(ratoi=0.3)
    with pytest.raises(UsageError, match="bad value 'x' for option 'ratio'"):
        _Typed(ratio="x")
    with pytest.raises(UsageError, match="must be >= 0"):
        _Typed(n=-1)
    with pytest.raises(AttributeError):
        _Typed().opts.ratoi  # noqa: B018


def test_spec_prints_only_changed_options():
    assert _Typed(names=["a"], n=2).spec() == "t-typed:2"
    assert create_pass("fold", named={"max_growth": 64}).spec() == "fold{max_growth=64}"


def test_graph_signature_ignores_names_and_order_but_not_rewiring():
    m = _model()
    sig = graph_signature(m)
    m.graph.nodes.reverse()
    for n in m.graph.nodes:
        n.name = n.name + "_renamed"
    assert graph_signature(m) == sig
    m.graph.nodes[0].inputs[0] = gs.Constant("k", np.ones(1, np.float32))
    assert graph_signature(m) != sig


def test_graph_signature_ignores_dead_nodes():
    m = _model()
    sig = graph_signature(m)
    x = m.graph.inputs[0]
    m.graph.nodes.append(gs.Node("Relu", inputs=[x], outputs=[gs.Variable("dead")]))
    assert graph_signature(m) == sig


def _doc_example() -> dict:
    """The full example of docs/passes/writing-a-pass.md, executed as written."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "passes" / "writing-a-pass.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "class DropIdentity" in b)
    namespace: dict = {}
    exec(compile(block, "writing-a-pass.md", "exec"), namespace)
    return namespace


IDENTITIES = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,4] x) => (float[2,4] y, float[2,4] z) {
  a = Relu(x)
  b = Identity(a)
  c = Neg(b)
  y = Identity(c)
  z = Identity(b)
}"""


def test_the_documented_example_pass_runs_under_the_contract():
    from sdgraph.ir import runtime

    cls = _doc_example()["DropIdentity"]
    m = Model.from_onnx_text(IDENTITIES)
    ref = runtime.run(m, seed=0)
    res = cls()(m)
    assert res.stats == {"removed": 1} and [n.op for n in m.graph.nodes].count("Identity") == 2
    rep = PassManager([cls(keep_outputs=False)], verify=True).run(m)
    assert rep.records[0].stats == {"removed": 2}
    assert sorted(n.op for n in m.graph.nodes) == ["Neg", "Relu"]  # Relu writes z, Neg writes y
    assert [t.name for t in m.graph.outputs] == ["y", "z"]
    out = runtime.run(m, seed=0)
    assert all((out[k] == ref[k]).all() for k in ("y", "z"))
    m2 = Model.from_onnx_text(IDENTITIES)
    next(n for n in m2.graph.nodes if n.op == "Identity").inputs[0] = gs.Constant("k", np.ones((2, 4), np.float32))
    with pytest.raises(PassError, match="pass 'drop-identity' cannot run: an Identity reads a constant"):
        cls()(m2)
