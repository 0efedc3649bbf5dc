"""The target contract: capabilities, a check before any work, legalization, artifacts, loading."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import pkgutil
from pathlib import Path
from typing import Any, ClassVar, Mapping, Protocol

import numpy as np

from sdgraph.errors import TargetUnavailable, UnsupportedError, UsageError
from sdgraph.passes.base import Option, parse_value

__all__ = [
    "Capability",
    "Problem",
    "Runner",
    "LowerContext",
    "Target",
    "register_target",
    "targets",
    "get_target",
    "ARTIFACT_KIND",
]

log = logging.getLogger(__name__)

ARTIFACT_KIND = "sdgraph-artifact"  # manifest "kind" of a lowered artifact directory


@dataclasses.dataclass(frozen=True)
class Capability:
    """What a target accepts. ``ops`` None means "whatever its runtime runs" (checked by loading)."""

    ops: frozenset[str] | None = None  # standard-domain op types
    canonical_ops: frozenset[str] = frozenset()  # ai.sdgraph ops it legalizes natively
    dtypes: frozenset[str] = frozenset({"float32", "int64", "int32", "bool"})
    precisions: tuple[str, ...] = ("fp32",)
    static_shapes: bool = False  # True: every input dimension must be known at lowering
    devices: tuple[str, ...] = ("cpu",)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One reason a graph cannot be lowered: which node, which op, why, and what would help."""

    node: str
    op: str
    reason: str
    hint: str = ""

    def __str__(self) -> str:
        return f"{self.node} ({self.op}): {self.reason}" + (f" — {self.hint}" if self.hint else "")


class Runner(Protocol):
    """A loaded submodel artifact: ``runner(feeds) -> outputs`` by name, numpy in and out."""

    input_names: list[str]
    output_names: list[str]

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclasses.dataclass
class LowerContext:
    """Everything a target needs besides the graph: precision, shape buckets, options, role."""

    precision: str = "fp32"
    shapes: list[dict[str, tuple[int, ...]]] = dataclasses.field(default_factory=list)  # buckets
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    role: str = "unknown"
    submodel: str = "model"
    # precision kept by the target's own mode (``supports_precision_mode``): node names that stay float32
    precision_keep: tuple[str, ...] | None = None
    precision_named: tuple[str, ...] = ()  # of those, the ones the user named (keep=): kept whatever the target's kernels do


class Target:
    """Base class of a lowering target; one module per target under ``sdgraph/targets/``.

    A subclass sets ``name``, ``summary``, ``extra`` (the pip extra that installs its runtime),
    ``capability`` and ``options``, and implements:

    - ``available() -> (bool, why)``: whether it can be used on this machine (imports lazily);
    - ``check(model, ctx) -> list[Problem]``: every node it cannot take, before any work;
    - ``legalize(model, ctx) -> None``: canonical ``ai.sdgraph`` ops to native forms, in place;
    - ``build(model, out_dir, ctx) -> dict``: write one submodel's artifacts, return its manifest entry;
    - ``load(artifact_dir, entry, ctx) -> Runner``: load a built submodel for run/bench/verify;
    - ``tool_versions() -> dict``: versions that go into the cache key;
    - ``precision_native(precision) -> (bool, why)``: whether this machine runs a precision at that precision
      (default yes; OpenVINO's bf16 runs f32 on a CPU without bf16 kernels);
    - ``refit(sub_dir, entry, changes, ctx) -> dict``: write new values of some initializers into a built
      submodel (``changes``: name -> (value now, new value)); returns manifest entry updates
      (``sdgraph refit``; the generic part is ``sdgraph.targets.refit``).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    extra: ClassVar[str | None] = None
    capability: ClassVar[Capability] = Capability()
    options: ClassVar[tuple[Option, ...]] = ()

    def available(self) -> tuple[bool, str]:
        return True, ""

    def require(self) -> None:
        ok, why = self.available()
        if not ok:
            hint = f" (pip install 'sdgraph[{self.extra}]')" if self.extra else ""
            raise TargetUnavailable(f"target {self.name!r} is not usable here: {why}{hint}")

    def parse_options(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        known = {o.name: o for o in self.options}
        out = {o.name: o.default for o in self.options}
        for k, v in raw.items():
            if k not in known:
                raise UsageError(f"target {self.name!r} has no option {k!r} (options: {', '.join(known) or 'none'})")
            out[k] = parse_value(known[k], v, f"target {self.name}")
        return out

    def check(self, model, ctx: LowerContext) -> list[Problem]:
        return []

    def legalize(self, model, ctx: LowerContext) -> None:
        pass

    def build(self, model, out_dir: Path, ctx: LowerContext) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def load(self, artifact_dir: Path, entry: Mapping[str, Any], ctx: LowerContext) -> Runner:  # pragma: no cover
        raise NotImplementedError

    def supports_precision_mode(self, precision: str) -> bool:
        """Whether a float32 graph with a recorded precision and keep list (``bf16{mode=target}``) runs in
        this target's own reduced-precision mode; False: the driver lowers the cast graph instead."""
        return False

    def precision_native(self, precision: str) -> tuple[bool, str]:
        """Whether this machine runs ``precision`` as such; False with why when the runtime would fall back
        (an artifact still builds and runs, but measures the fallback: ``tune`` leaves such precisions out)."""
        return True, ""

    def tool_versions(self) -> dict[str, str]:
        return {}

    def refit_shared(self, sub_dir: Path, entry: Mapping[str, Any]) -> list[Path]:
        """Files of the artifact's ``sub_dir`` that ``refit`` never writes: the refitted artifact hard-links them
        (same filesystem) instead of copying. Default: none, everything is copied."""
        return []

    def refit(self, sub_dir: Path, entry: Mapping[str, Any], changes: Mapping[str, tuple[np.ndarray, np.ndarray]],
              ctx: LowerContext) -> dict[str, Any]:
        raise UnsupportedError(f"target {self.name!r} cannot refit weights yet: lower the LoRA-fused model again "
                               "(sdgraph optimize --passes lora{file=...}, then sdgraph lower)")


_TARGETS: dict[str, type[Target]] = {}
_DISCOVERED = False


def register_target(cls: type[Target]) -> type[Target]:
    """Class decorator; a target may register several names by subclassing (ascend310p/910b)."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a name")
    _TARGETS[cls.name] = cls
    return cls


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    # This module's own folder: importing the package here would make base depend on its API.
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if not info.name.startswith("_") and info.name not in ("base", "driver", "cache", "refit"):
            importlib.import_module(f"sdgraph.targets.{info.name}")


def targets() -> dict[str, type[Target]]:
    _discover()
    return dict(sorted(_TARGETS.items()))


def get_target(name: str) -> Target:
    reg = targets()
    if name not in reg:
        raise UsageError(f"unknown target {name!r} (targets: {', '.join(reg) or 'none'}; see `sdgraph targets`)")
    return reg[name]()
