"""sdgraph.ir.topology: the dataflow DiGraph, cycles named by node, and the verifier that uses it."""

from __future__ import annotations

import pytest

from sdgraph.errors import PassError
from sdgraph.ir.model import Model
from sdgraph.ir.topology import dataflow, describe_nodes, find_cycle
from sdgraph.passes.manager import verify_structure
from tests.graphs import ADD_MUL


def _nodes(m: Model) -> dict[str, object]:
    return {n.outputs[0].name: n for n in m.graph.nodes}


def _cyclic() -> Model:
    """ADD_MUL with ``a = Mul(y, d)``: a -> y -> a."""
    m = Model.from_onnx_text(ADD_MUL)
    by_out = _nodes(m)
    by_out["a"].inputs[0] = by_out["y"].outputs[0]
    return m


def test_dataflow_has_one_edge_per_producer_consumer_pair():
    m = Model.from_onnx_text(ADD_MUL)
    g = dataflow(m.graph)
    names = {i: n.outputs[0].name for i, n in enumerate(m.graph.nodes)}
    edges = {(names[u], names[v]) for u, v in g.edges}
    # c feeds d twice (Mul(c, c)): still one edge; graph input x adds none
    assert edges == {("c", "d"), ("d", "a"), ("d", "b"), ("a", "y"), ("b", "y")}
    assert g.number_of_nodes() == len(m.graph.nodes) == 5


def test_acyclic_graph_has_no_cycle():
    assert find_cycle(Model.from_onnx_text(ADD_MUL).graph) == []


def test_cycle_is_returned_in_dataflow_order():
    m = _cyclic()
    cycle = find_cycle(m.graph)
    outs = [n.outputs[0].name for n in cycle]
    assert sorted(outs) == ["a", "y"]
    # each node of the cycle reads the one before it
    for prev, node in zip(cycle[-1:] + cycle[:-1], cycle):
        assert any(t is prev.outputs[0] for t in node.inputs)


def test_self_loop_is_a_cycle():
    m = Model.from_onnx_text(ADD_MUL)
    y = _nodes(m)["y"]
    y.inputs[1] = y.outputs[0]
    assert find_cycle(m.graph) == [y]


def test_describe_nodes_closes_the_cycle_and_cuts_long_ones():
    m = Model.from_onnx_text(ADD_MUL)
    n = m.graph.nodes
    n[0].name, n[1].name = "first", ""
    assert describe_nodes([n[0], n[1]]) == "first (Constant) -> <unnamed> (Mul) -> first (Constant)"
    assert describe_nodes(list(n), limit=2).endswith("... 3 more")
    assert describe_nodes([]) == ""


def test_verifier_names_the_cycle_and_leaves_the_graph_alone():
    m = _cyclic()
    order = [id(n) for n in m.graph.nodes]
    with pytest.raises(PassError, match=r"graph is not a DAG after the pass: cycle .*\((Add|Mul)\) -> .*\((Add|Mul)\) -> "):
        verify_structure(m)
    assert [id(n) for n in m.graph.nodes] == order


def test_verifier_sorts_an_acyclic_graph_topologically():
    m = Model.from_onnx_text(ADD_MUL)
    m.graph.nodes.reverse()
    verify_structure(m)
    seen: set[str] = {t.name for t in m.graph.inputs}
    for node in m.graph.nodes:
        assert all(t.name in seen or not t.inputs for t in node.inputs)
        seen.update(t.name for t in node.outputs)
