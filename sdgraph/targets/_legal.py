"""Legalization helpers the targets share: inline canonical model-local functions into standard ops."""

from __future__ import annotations

import logging

import onnx
import onnx.inliner

from sdgraph.ir.model import Model

__all__ = ["inline_functions", "canonical_counts", "run_pass_if_registered"]

log = logging.getLogger(__name__)


def canonical_counts(model: Model) -> dict[str, int]:
    """How many nodes of each model-local function op the graph calls."""
    counts: dict[str, int] = {}
    for n in model.graph.nodes:
        if ((n.domain or ""), n.op) in model.functions:
            counts[n.op] = counts.get(n.op, 0) + 1
    return counts


def inline_functions(model: Model, keep: set[tuple[str, str]] | frozenset = frozenset()) -> int:
    """Replace every call of a model-local function (except ``keep``) by its body, in place.

    Weights stay external: the proto carries references only. Returns the number of calls inlined.
    """
    todo = [(n.domain or "", n.op) for n in model.graph.nodes if ((n.domain or ""), n.op) in model.functions
            and ((n.domain or ""), n.op) not in keep]
    if not todo:
        return 0
    proto = model.to_proto()
    if keep:
        proto = onnx.inliner.inline_selected_functions(proto, sorted(keep), exclude=True)
    else:
        proto = onnx.inliner.inline_local_functions(proto)
    fresh = Model.from_proto(proto, base_dir=model.base_dir)
    fresh.path, fresh.metadata = model.path, dict(model.metadata)
    fresh.functions = {k: v for k, v in model.functions.items() if k in keep}
    model.assign(fresh)
    log.info("inlined %d canonical calls", len(todo))
    return len(todo)


def run_pass_if_registered(model: Model, name: str) -> bool:
    """Run pass ``name`` (e.g. the fusion engineer's ``ort-contrib``) when it exists; False otherwise."""
    from sdgraph.passes.base import registry

    if name not in registry():
        return False
    from sdgraph.passes.manager import PassManager

    PassManager(name).run(model)
    return True
