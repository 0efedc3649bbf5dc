"""What gets quantized: the ignored scope (SD defaults + user names) and the Conv/Gemm/MatMul layers."""

from __future__ import annotations

from typing import Iterable

import onnx_graphsurgeon as gs

from sdgraph.errors import UsageError
from sdgraph.passes._precision import default_scope, match_names

__all__ = ["QUANT_OPS", "resolve_scope", "quantized_nodes", "activation_matmuls", "watched_tensors"]

QUANT_OPS = ("Conv", "Gemm", "MatMul")


def resolve_scope(model, exclude: Iterable[str]) -> tuple[list[str], list[str]]:
    """(node names kept in float, notes) for ``exclude`` items: ``default`` (the SD scope), ``none``, names."""
    names: list[str] = []
    notes: list[str] = []
    for item in exclude:
        if item == "default":
            found, n = default_scope(model)
            names += found
            notes += n
        elif item != "none":
            found = match_names(model.graph, [item])
            if not found:
                raise UsageError(f"pass 'qdq': exclude={item!r} matches no node")
            names += found
    return list(dict.fromkeys(names)), notes


def quantized_nodes(graph) -> list:
    """Conv/Gemm/MatMul nodes whose inputs all come from DequantizeLinear (they run in INT8)."""
    return [n for n in graph.nodes
            if n.op in QUANT_OPS and all(t.inputs and t.inputs[0].op == "DequantizeLinear" for t in n.inputs[:2])]


def activation_matmuls(graph) -> list[str]:
    """MatMuls of two activations (attention scores and probabilities x values)."""
    return [n.name for n in graph.nodes if n.op == "MatMul" and not isinstance(n.inputs[1], gs.Constant)]


def watched_tensors(graph, excluded: Iterable[str], act_matmul: bool) -> set[str]:
    """Inputs and outputs of the layers that will be quantized: the only tensors calibration must range."""
    skip = set(excluded)
    watch: set[str] = set()
    for n in graph.nodes:
        if n.name in skip or n.op not in QUANT_OPS:
            continue
        if n.op == "MatMul" and not act_matmul and not isinstance(n.inputs[1], gs.Constant):
            continue  # attention scores / probabilities: not quantized, not watched
        watch.update(t.name for t in n.inputs[:2] if not isinstance(t, gs.Constant))
        watch.update(t.name for t in n.outputs)
    return watch
