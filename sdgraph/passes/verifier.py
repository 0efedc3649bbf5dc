"""The verifier the manager runs around each pass: structural checks, and outputs compared in ONNX Runtime."""

from __future__ import annotations

import collections

import onnx_graphsurgeon as gs

from sdgraph.errors import InputError, PassError
from sdgraph.ir.model import Model
from sdgraph.ir.topology import describe_nodes, find_cycle
from sdgraph.passes.base import Pass

__all__ = ["verify_structure", "run_after", "judge"]


def verify_structure(model: Model, expected_outputs: list[str] | None = None) -> None:
    """Cheap checks: acyclic, unique node names, no dangling tensors, graph outputs intact."""
    graph = model.graph
    cycle = find_cycle(graph)
    if cycle:
        raise PassError(f"graph is not a DAG after the pass: cycle {describe_nodes(cycle)}")
    graph.toposort()
    names = collections.Counter(n.name for n in graph.nodes if n.name)
    dup = [n for n, c in names.items() if c > 1]
    if dup:
        raise PassError(f"duplicate node names: {', '.join(sorted(dup)[:5])}")
    graph_inputs = {t.name for t in graph.inputs}
    producers: dict[str, int] = collections.Counter()
    for node in graph.nodes:
        for out in node.outputs:
            producers[out.name] += 1
    multi = [n for n, c in producers.items() if c > 1]
    if multi:
        raise PassError(f"tensors with more than one producer: {', '.join(sorted(multi)[:5])}")
    for node in graph.nodes:
        for t in node.inputs:
            if isinstance(t, gs.Constant) or t.name == "" or t.name in graph_inputs or t.name in producers:
                continue
            raise PassError(f"node {node.name!r} ({node.op}) reads {t.name!r}, which nothing produces")
    outs = [t.name for t in graph.outputs]
    if expected_outputs is not None and outs != expected_outputs:
        raise PassError(f"graph outputs changed: {expected_outputs} -> {outs}")
    for t in graph.outputs:
        if t.name not in producers and t.name not in graph_inputs:
            raise PassError(f"graph output {t.name!r} is no longer produced")


def run_after(p: Pass, model: Model, feeds) -> dict:
    """ONNX Runtime; for an approximate pass whose graph ORT's CPU provider cannot load (bf16), OpenVINO."""
    from sdgraph.ir import runtime

    try:
        return runtime.run(model, feeds)
    except InputError:
        if p.exact:
            raise
        from sdgraph.passes._precision import run_any

        return run_any(model, feeds, runtime="openvino")[0]


def judge(p: Pass, numbers: dict[str, float]) -> str | None:
    """Why the outputs after ``p`` are not acceptable (exact: max_rel over ``rtol``; approximate:
    cosine under an explicit ``min_cosine``; any pass: NaN/Inf), or None."""
    if numbers["cosine"] != numbers["cosine"]:  # NaN
        return "outputs are NaN/Inf after the pass"
    min_cos = getattr(p.opts, "min_cosine", None)
    if p.exact:
        if numbers["max_rel"] > p.rtol:
            return f"outputs moved by max_rel {numbers['max_rel']:.3g} (> {p.rtol:g}), cosine {numbers['cosine']:.6f}"
    elif min_cos is not None and numbers["cosine"] < float(min_cos):
        return f"cosine {numbers['cosine']:.6f} is below min_cosine={min_cos}"
    return None
