"""Targets: one module each, behind the contract in ``base``; ``driver.lower`` runs them."""

from sdgraph.targets.base import Capability, LowerContext, Problem, Runner, Target, get_target, register_target, targets

__all__ = ["Capability", "LowerContext", "Problem", "Runner", "Target", "get_target", "register_target", "targets", "lower", "load_artifact"]


def lower(src, target: str, out, **kwargs):
    from sdgraph.targets.driver import lower as _lower

    return _lower(src, target, out, **kwargs)


def load_artifact(path, **kwargs):
    from sdgraph.targets.driver import load_artifact as _load

    return _load(path, **kwargs)
