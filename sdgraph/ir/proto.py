"""Walking ONNX messages: below io and outputs, which both need it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import onnx

__all__ = ["iter_tensors", "iter_model_tensors", "is_external", "external_info", "external_data_files"]


def iter_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto in a graph: initializers, sparse initializers, node attributes, subgraphs."""
    return (t for t, _ in _graph_tensors(graph))


def iter_model_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of a model: the graph's (recursively) and those inside function bodies."""
    return (t for t, _ in _model_tensors(proto))


def _model_tensors(proto: onnx.ModelProto) -> Iterator[tuple[onnx.TensorProto, bool]]:
    """(tensor, movable): movable tensors may be moved out to the data file on save.

    Sparse parts and function bodies keep whatever layout they came with (their external
    references are validated and copied, but inline data is never moved out of them).
    """
    yield from _graph_tensors(proto.graph)
    for fn in proto.functions:
        for t, _ in _node_tensors(fn.node):
            yield t, False


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[tuple[onnx.TensorProto, bool]]:
    for t in graph.initializer:
        yield t, True
    for sp in graph.sparse_initializer:
        yield sp.values, False
        yield sp.indices, False
    yield from _node_tensors(graph.node)


def _node_tensors(nodes) -> Iterator[tuple[onnx.TensorProto, bool]]:
    """Tensors held by node attributes (Constant values, sparse values, If/Loop/Scan bodies)."""
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t, True
            for t in attr.tensors:
                yield t, True
            for sp in ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors):
                yield sp.values, False
                yield sp.indices, False
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _graph_tensors(g)


def is_external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


def external_info(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def external_data_files(proto: onnx.ModelProto, base: str | os.PathLike) -> list[Path]:
    """Every file the model's external data lives in (graph, subgraphs, functions), resolved, sorted.

    Locations are not validated here (``load_proto`` does that); a reference that escapes ``base``
    is still listed, so callers refusing outputs over inputs see it.
    """
    base = Path(base)
    files = {(base / external_info(t).get("location", "")).resolve()
             for t in iter_model_tensors(proto) if is_external(t) and external_info(t).get("location")}
    return sorted(files)
