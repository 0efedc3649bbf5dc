"""The converter table: (domain, op) -> one converter with its own support check."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import onnx_graphsurgeon as gs

__all__ = ["Converter", "CONVERTERS", "converter"]

# supports(node, opset) -> None when the converter takes the node, else the reason it does not
SupportCheck = Callable[[gs.Node, int], Optional[str]]


def _always(node: gs.Node, opset: int) -> str | None:
    return None


@dataclasses.dataclass(frozen=True)
class Converter:
    """How one op (or op family) becomes torch.fx nodes.

    ``emit(em, x)`` gets the emitter and the node's view (``NodeArgs``) and returns one value per
    output. ``shape`` (optional) is the same op on Python shape arithmetic, tried first when every
    input is shape-like and the output is 0-/1-D; it returns None to fall back to ``emit``.
    """

    ops: tuple[str, ...]
    emit: Callable
    supports: SupportCheck = _always
    shape: Optional[Callable] = None
    domain: str = ""
    family: str = ""


CONVERTERS: dict[tuple[str, str], Converter] = {}


def converter(*ops: str, supports: SupportCheck | None = None, shape: Callable | None = None, domain: str = ""):
    """Register the decorated ``emit(em, x)`` for ``ops`` in ``domain``."""

    def deco(fn: Callable) -> Callable:
        conv = Converter(tuple(ops), fn, supports or _always, shape, domain, fn.__module__.rsplit(".", 1)[-1])
        for op in ops:
            if (domain, op) in CONVERTERS:
                raise RuntimeError(f"two torch converters for {domain or 'ai.onnx'}::{op}")
            CONVERTERS[(domain, op)] = conv
        return fn

    return deco
