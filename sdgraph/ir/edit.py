"""Graph edits the passes share: replace all uses of a tensor, insert a node after one, remove dead nodes."""

from __future__ import annotations

from typing import Any

import onnx_graphsurgeon as gs

from sdgraph.ir.build import GraphBuilder

__all__ = ["replace_all_uses", "insert_after", "remove_dead"]


def replace_all_uses(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor, *, skip: gs.Node | None = None) -> int:
    """Make every reader of ``old`` (nodes, except ``skip``, and graph outputs) read ``new``; returns the count.

    A graph output keeps its name: when ``old`` is one, ``new`` takes its place in ``graph.outputs``.
    """
    count = 0
    for node in list(old.outputs):
        if node is skip:
            continue
        for i, t in enumerate(node.inputs):
            if t is old:
                node.inputs[i] = new
                count += 1
    for i, t in enumerate(graph.outputs):
        if t is old:
            graph.outputs[i] = new
            count += 1
    return count


def insert_after(b: GraphBuilder, t: gs.Tensor, op: str, extra_inputs: tuple = (), **kwargs: Any) -> gs.Variable:
    """Insert ``op(t, *extra_inputs)`` after ``t``: every other reader of ``t`` now reads its output.

    ``kwargs`` go to ``GraphBuilder.op`` (name, attrs, domain, dtype). When ``t`` is a graph
    output, the new tensor takes over its place and its name (``t`` is renamed ``<name>_pre``), so
    the graph's interface is unchanged.
    """
    new = b.op(op, [t, *extra_inputs], **kwargs)
    replace_all_uses(b.graph, t, new, skip=new.inputs[0])
    if any(x is new for x in b.graph.outputs):
        old_name = t.name
        t.name = b.unique(f"{old_name}_pre")
        new.name = old_name
    return new


def remove_dead(graph: gs.Graph) -> int:
    """Remove nodes and tensors nothing reads (graph inputs are kept), keep a topological order;
    returns how many nodes were removed."""
    before = len(graph.nodes)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return before - len(graph.nodes)
