"""geglu: fuse the GEGLU feed-forward gate (split, erf-Gelu, Mul) into one ai.sdgraph GeGLU node."""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import onnx_graphsurgeon as gs

from sdgraph.ir import canonical
from sdgraph.ir.build import GraphBuilder
from sdgraph.ir.edit import remove_dead
from sdgraph.ir.pattern import Mismatch, const_value, dims, eval_small, producer, scalar, single_consumer
from sdgraph.ir.shapes import infer_shapes
from sdgraph.passes.base import Pass, PassResult, register

__all__ = ["FuseGeGLU", "GeGLUMatch", "ErfGelu", "match_erf_gelu", "match_geglu", "GATES", "HALVES"]

log = logging.getLogger(__name__)


def _close(v: float | None, want: float) -> bool:
    return v is not None and abs(v - want) <= 1e-4 * abs(want)


def _other(node: gs.Node, t: gs.Tensor) -> gs.Tensor:
    a, b = node.inputs
    return b if a is t else a


@dataclasses.dataclass(frozen=True)
class GeGLUMatch:
    """One matched GEGLU: ``out`` = first half of ``x`` · Gelu(second half), halves on the last axis."""

    x: gs.Tensor
    out: gs.Tensor
    gate: str  # which GATES variant matched ("Erf" or "Gelu")
    halves: str  # which HALVES variant produced them ("Split" or "Slice")


def _half(t: gs.Tensor) -> tuple[gs.Tensor, int, str]:
    """(source x, which half: 0 first / 1 second, variant) when t is a last-axis half of x; else Mismatch."""
    node = producer(t)
    if node is None:
        raise Mismatch(f"{t.name} is not a slice of the projection")
    x = node.inputs[0]
    xs = dims(x)
    if xs is None or xs[-1] is None:
        raise Mismatch("GEGLU projection has no static last dimension")
    if node.op not in HALVES:
        raise Mismatch(f"{t.name} comes from {node.op}, not a {'/'.join(HALVES)}")
    return x, HALVES[node.op](node, t, xs[-1], len(xs)), node.op


def _half_of_split(node: gs.Node, t: gs.Tensor, last: int, rank: int) -> int:
    """Which half of the last axis a Split output is (0 or 1), else Mismatch."""
    axis = node.attrs.get("axis", 0)
    if axis not in (-1, rank - 1) or len(node.outputs) != 2:
        raise Mismatch("Split is not in two along the last axis")
    sizes = const_value(node.inputs[1]) if len(node.inputs) > 1 and not node.inputs[1].is_empty() else node.attrs.get("split")
    if sizes is not None and list(np.asarray(sizes).ravel()) != [last // 2, last // 2]:
        raise Mismatch(f"Split sizes {list(np.asarray(sizes).ravel())} are not two halves")
    return node.outputs.index(t)


def _half_of_slice(node: gs.Node, t: gs.Tensor, last: int, rank: int) -> int:
    """Which half of the last axis a constant Slice takes (0 or 1), else Mismatch."""
    starts, ends = eval_small(node.inputs[1]), eval_small(node.inputs[2])
    axes = eval_small(node.inputs[3]) if len(node.inputs) > 3 and not node.inputs[3].is_empty() else None
    steps = eval_small(node.inputs[4]) if len(node.inputs) > 4 and not node.inputs[4].is_empty() else None
    if starts is None or ends is None or starts.size != 1:
        raise Mismatch("Slice bounds are not constant (run fold first)")
    ax = int(axes.ravel()[0]) if axes is not None else 0
    if ax not in (-1, rank - 1) or steps is not None and int(steps.ravel()[0]) != 1:
        raise Mismatch("Slice is not along the last axis with step 1")
    s, e = int(starts.ravel()[0]), min(int(ends.ravel()[0]), last)
    if (s, e) == (0, last // 2):
        return 0
    if (s, e) == (last // 2, last):
        return 1
    raise Mismatch(f"Slice [{s}:{e}] of {last} is not a half")


# Pattern variants as data: how the two halves are cut (producer op -> which half a tensor is) ...
HALVES = {"Split": _half_of_split, "Slice": _half_of_slice}


def _gelu_from_op(erf: gs.Node) -> tuple[gs.Tensor, gs.Tensor]:
    """The standard Gelu op (exact form): (g, Gelu(g))."""
    if erf.attrs.get("approximate", "none") != "none":
        raise Mismatch("tanh-approximate Gelu is not GEGLU's exact Gelu")
    return erf.inputs[0], erf.outputs[0]


@dataclasses.dataclass(frozen=True)
class ErfGelu:
    """One exact Gelu written with Erf: ``out`` = g · 0.5 · (1 + erf(g/√2)); ``nodes`` from the scaling of
    g to the last Mul (a ``0.5 · g`` computed beside the chain is not among them)."""

    g: gs.Tensor
    out: gs.Tensor
    nodes: tuple[gs.Node, ...]


def match_erf_gelu(erf: gs.Node) -> ErfGelu:
    """The exact Gelu around an ``Erf`` (g/√2 as Div or Mul, the Muls by g and by 0.5 in any order,
    or 0.5 · g first), else Mismatch with the reason. The one matcher of the geglu pass and of
    targets that lower Gelu whole (the Neural Engine)."""
    pre = producer(erf.inputs[0])
    if pre is None or pre.op not in ("Div", "Mul"):
        raise Mismatch("Erf input is not g/√2")
    g = pre.inputs[0]
    c = scalar(pre.inputs[1])
    if not (_close(c, math.sqrt(2)) if pre.op == "Div" else _close(c, 1 / math.sqrt(2))):
        raise Mismatch(f"Erf argument is scaled by {c}, not 1/√2")
    add = single_consumer(erf.outputs[0], "Add")
    if not _close(scalar(_other(add, erf.outputs[0])), 1.0):
        raise Mismatch("Erf is not followed by + 1")
    # g * (1 + erf) * 0.5, the two Muls in either order
    t = add.outputs[0]
    nodes = [pre, erf, add]
    seen_g = seen_half = False
    for _ in range(2):
        mul = single_consumer(t, "Mul")
        o = _other(mul, t)
        if o is g and not seen_g:
            seen_g = True
        elif _close(scalar(o), 0.5) and not seen_half:
            seen_half = True
        else:
            if not seen_g and o is not g:
                # 0.5 * g computed first: Mul(g, 0.5) feeding this Mul
                po = producer(o)
                if po is not None and po.op == "Mul" and g in po.inputs and _close(scalar(_other(po, g)), 0.5):
                    seen_g = seen_half = True
                    t = mul.outputs[0]
                    nodes.append(mul)
                    break
            raise Mismatch("the Gelu product is not g · 0.5 · (1 + erf)")
        t = mul.outputs[0]
        nodes.append(mul)
    if not (seen_g and seen_half):
        raise Mismatch("the Gelu product is not g · 0.5 · (1 + erf)")
    return ErfGelu(g, t, tuple(nodes))


def _gelu_from_erf(erf: gs.Node) -> tuple[gs.Tensor, gs.Tensor]:
    """g · 0.5 · (1 + erf(g/√2)) around an Erf: (g, the product)."""
    m = match_erf_gelu(erf)
    return m.g, m.out


# ... and how the Gelu of the gate is written (anchor op -> (g, Gelu(g))).
GATES = {"Erf": _gelu_from_erf, "Gelu": _gelu_from_op}


def match_geglu(erf: gs.Node) -> GeGLUMatch:
    """Match GEGLU around an Erf (or a standard Gelu); raise Mismatch with the reason otherwise.

    Cases handled (variants in GATES and HALVES):
      1. h * (g * 0.5 * (1 + erf(g / √2))) in any order of the Mul by g and by 0.5, g/√2 as Div
         or Mul by 1/√2 (both exporters).
      2. h * Gelu(g) with the standard Gelu op (approximate="none", opset 20).
      3. h, g as the two halves of one tensor along the last axis, from Split or two Slices.
    """
    g, gelu_out = GATES[erf.op](erf)
    final = single_consumer(gelu_out, "Mul")
    h = _other(final, gelu_out)
    xg, which_g, cut = _half(g)
    xh, which_h, _ = _half(h)
    if xg is not xh or (which_h, which_g) != (0, 1):
        raise Mismatch("hidden and gate are not the first and second halves of one projection")
    return GeGLUMatch(xg, final.outputs[0], erf.op, cut)


@register
class FuseGeGLU(Pass):
    """Fuse diffusers' GEGLU gate into ``ai.sdgraph.GeGLU`` (see ``match_geglu`` for the cases).

    Expected = Erf nodes plus exact Gelu nodes; each unmatched one is a near miss with its reason.
    """

    name = "geglu"
    summary = "Fuse the GEGLU feed-forward gate (halves, erf-Gelu, Mul) into canonical ai.sdgraph GeGLU"
    pattern = True
    options = ()

    def run(self, model) -> PassResult:
        graph = model.graph
        infer_shapes(model)
        b = GraphBuilder(graph)
        anchors = [n for n in graph.nodes if n.op in GATES and n.domain in (None, "", "ai.onnx")]
        near: list[tuple[str, str]] = []
        fused = 0
        for i, node in enumerate(anchors):
            try:
                m = match_geglu(node)
            except Mismatch as exc:
                near.append((node.name, str(exc)))
                continue
            canonical.make_node(model, "GeGLU", [m.x], [m.out], {}, f"sdgraph_geglu_{i}", builder=b)
            fused += 1
        if fused:
            remove_dead(graph)
        for name, why in near:
            log.debug("geglu near miss %s: %s", name, why)
        return PassResult(fused > 0, {"geglu_fused": fused}, expected=len(anchors), matched=fused,
                          near_misses=near if self.debug else near[:1])
