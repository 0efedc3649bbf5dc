"""Legalization helpers the targets share (the inliner itself is ``sdgraph.ir.canonical.inline_functions``)."""

from __future__ import annotations

import logging

from sdgraph.ir.model import Model

__all__ = ["canonical_counts", "run_pass_if_registered"]

log = logging.getLogger(__name__)


def canonical_counts(model: Model) -> dict[str, int]:
    """How many nodes of each model-local function op the graph calls."""
    counts: dict[str, int] = {}
    for n in model.graph.nodes:
        if ((n.domain or ""), n.op) in model.functions:
            counts[n.op] = counts.get(n.op, 0) + 1
    return counts


def run_pass_if_registered(model: Model, name: str) -> bool:
    """Run pass ``name`` (e.g. the fusion engineer's ``ort-contrib``) when it exists; False otherwise."""
    from sdgraph.passes.base import registry

    if name not in registry():
        return False
    from sdgraph.passes.manager import PassManager

    PassManager(name).run(model)
    return True
