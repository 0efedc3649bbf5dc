"""cse: common subexpression elimination (identical nodes on identical inputs)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from sdgraph.passes.base import Pass, PassResult, register

__all__ = ["Cse"]

_SIDE_EFFECTS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
_SMALL_CONST = 4096


def _const_key(t: gs.Constant):
    """Small constants compare by value, large ones by identity."""
    shape = tuple(t.shape or ())
    if int(np.prod(shape)) * (np.dtype(t.dtype).itemsize if t.dtype is not None else 8) <= _SMALL_CONST:
        v = np.asarray(t.values)
        return ("v", str(v.dtype), v.shape, v.tobytes())
    return ("id", id(t))


def _attr_key(v):
    if isinstance(v, gs.Constant):
        return _const_key(v)
    if isinstance(v, gs.Graph):
        return ("graph", id(v))
    if isinstance(v, (list, tuple)):
        return tuple(_attr_key(x) for x in v)
    if isinstance(v, np.ndarray):
        return (str(v.dtype), v.shape, v.tobytes())
    return v


@register
class Cse(Pass):
    """Merge nodes that compute the same value.

    Cases handled:
      1. Same op, domain and attributes on the same input tensors: later copies are removed
         and their consumers read the first copy's outputs.
      2. Small constant inputs (<= 4 KiB) compare by value, so duplicated shape constants match.
      3. Nodes with random outputs or subgraphs are never merged; graph outputs are kept.
    """

    name = "cse"
    summary = "Common subexpression elimination: identical nodes on identical inputs computed once"

    def run(self, model) -> PassResult:
        graph = model.graph.toposort()
        graph_outputs = {id(t) for t in graph.outputs}
        seen: dict[tuple, gs.Node] = {}
        merged = 0
        for node in graph.nodes:
            if node.op in _SIDE_EFFECTS or any(isinstance(v, gs.Graph) for v in node.attrs.values()):
                continue
            if any(id(o) in graph_outputs for o in node.outputs):
                continue
            ins = tuple(_const_key(t) if isinstance(t, gs.Constant) else ("t", id(t)) for t in node.inputs)
            attrs = tuple(sorted((k, _attr_key(v)) for k, v in node.attrs.items()))
            key = (node.domain or "", node.op, ins, attrs, len(node.outputs))
            first = seen.get(key)
            if first is None:
                seen[key] = node
                continue
            for dup_out, keep_out in zip(node.outputs, first.outputs):
                for consumer in list(dup_out.outputs):
                    for i, t in enumerate(consumer.inputs):
                        if t is dup_out:
                            consumer.inputs[i] = keep_out
            node.outputs.clear()
            merged += 1
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=merged > 0, stats={"merged": merged})
