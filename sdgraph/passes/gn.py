"""gn: fuse exported GroupNorm (Reshape, InstanceNormalization, Reshape, Mul, Add [, SiLU]) into one node."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_graphsurgeon as gs

from sdgraph.ir import canonical
from sdgraph.ir.build import GraphBuilder
from sdgraph.ir.edit import remove_dead
from sdgraph.ir.pattern import Mismatch, const_value, dims, producer, single_consumer
from sdgraph.ir.shapes import infer_shapes
from sdgraph.passes.base import Option, Pass, PassResult, register

__all__ = ["FuseGroupNorm", "GroupNormMatch", "match_group_norm", "EPILOGUES"]

log = logging.getLogger(__name__)


def _other(node: gs.Node, t: gs.Tensor) -> gs.Tensor:
    a, b = node.inputs
    return b if a is t else a


@dataclasses.dataclass(frozen=True)
class GroupNormMatch:
    """One matched GroupNorm: ``affine_out`` = GroupNorm(x)·gamma + beta; ``out`` = SiLU of it when
    ``silu``, else ``affine_out``."""

    x: gs.Tensor
    gamma: gs.Tensor
    beta: gs.Tensor
    groups: int
    epsilon: float
    affine_out: gs.Tensor
    silu: bool
    out: gs.Tensor

    def without_silu(self) -> "GroupNormMatch":
        return dataclasses.replace(self, silu=False, out=self.affine_out)

    @property
    def canonical_op(self) -> str:
        return EPILOGUES["silu" if self.silu else "none"][1]


def _silu_after(t: gs.Tensor) -> gs.Tensor | None:
    """SiLU written as Mul(t, Sigmoid(t)): its output, else None."""
    users = t.outputs
    if len(users) == 2 and {u.op for u in users} == {"Sigmoid", "Mul"}:
        sig = next(u for u in users if u.op == "Sigmoid")
        m2 = next(u for u in users if u.op == "Mul")
        if sig.outputs[0].outputs == [m2] and set(map(id, m2.inputs)) == {id(t), id(sig.outputs[0])}:
            return m2.outputs[0]
    return None


# Pattern variants as data: what may follow the affine Add, tried in order: (matcher, canonical op).
EPILOGUES = {
    "silu": (_silu_after, "GroupNormSilu"),
    "none": (lambda t: t, "GroupNorm"),
}


def match_group_norm(inorm: gs.Node) -> GroupNormMatch:
    """Match the GroupNorm around ``inorm``; raise Mismatch with the reason otherwise.

    Cases handled:
      1. x -> Reshape([N|0, G, -1]) -> InstanceNormalization(ones, zeros) -> Reshape(x's shape)
         -> Mul(gamma) -> Add(beta): torch's legacy and dynamo exports of nn.GroupNorm.
      2. The same followed by SiLU as Sigmoid + Mul(pre, sigmoid) (ResNet blocks), fused too.
    """
    xg = inorm.inputs[0]
    rs = producer(xg)
    if rs is None or rs.op != "Reshape":
        raise Mismatch("InstanceNormalization input is not a Reshape")
    x = rs.inputs[0]
    shape = const_value(rs.inputs[1])
    if shape is None or shape.size != 3 or shape[2] != -1:
        raise Mismatch("the Reshape before InstanceNormalization is not [N, G, -1]")
    groups = int(shape[1])
    xs = dims(x)
    if xs is None or len(xs) < 3 or xs[1] is None:
        raise Mismatch("GroupNorm input has no known rank >= 3 and channel count (run shape inference)")
    if xs[1] % groups:
        raise Mismatch(f"{xs[1]} channels do not split into {groups} groups")
    scale, bias = const_value(inorm.inputs[1]), const_value(inorm.inputs[2])
    if scale is None or bias is None or scale.size != groups or not np.all(scale == 1) or np.any(bias != 0):
        raise Mismatch("InstanceNormalization scale/bias are not ones/zeros per group")
    back = single_consumer(inorm.outputs[0], "Reshape")
    ys = dims(back.outputs[0])
    if ys is None or len(ys) != len(xs) or any(a is not None and b is not None and a != b for a, b in zip(xs, ys)) or (
        any(d is None for d in xs) and not _is_shape_of(back.inputs[1], x)
    ):
        raise Mismatch("the Reshape after InstanceNormalization does not restore the input shape")
    n = back.outputs[0]
    mul = single_consumer(n, "Mul")
    gamma = _other(mul, n)
    add = single_consumer(mul.outputs[0], "Add")
    beta = _other(add, mul.outputs[0])
    c = xs[1]
    for name, t in (("gamma", gamma), ("beta", beta)):
        v = const_value(t)
        if v is None:
            raise Mismatch(f"GroupNorm {name} is not a constant")
        padded = (1,) * (len(xs) - v.ndim) + tuple(v.shape)
        if len(padded) != len(xs) or any(d != 1 for j, d in enumerate(padded) if j != 1) or padded[1] not in (1, c):
            raise Mismatch(f"GroupNorm {name} of shape {v.shape} is not per-channel")
    affine = add.outputs[0]
    for kind, (epilogue, _) in EPILOGUES.items():  # noqa: B007 (kind is read after the loop)
        out = epilogue(affine)
        if out is not None:
            break
    return GroupNormMatch(x, gamma, beta, groups, float(inorm.attrs.get("epsilon", 1e-5)), affine, kind == "silu", out)


def _is_shape_of(shape_t: gs.Tensor, x: gs.Tensor) -> bool:
    node = producer(shape_t)
    return node is not None and node.op == "Shape" and node.inputs[0] is x and not node.attrs.get("start") and node.attrs.get("end") is None


@register
class FuseGroupNorm(Pass):
    """Fuse exported GroupNorm into ``ai.sdgraph.GroupNorm`` / ``GroupNormSilu``.

    Cases handled (see ``match_group_norm``):
      1. GroupNorm with per-channel affine, from both torch exporters.
      2. GroupNorm followed by SiLU (Sigmoid + Mul), unless ``silu=false``.
    Expected = InstanceNormalization nodes; each unmatched one is a near miss with its reason.
    """

    name = "gn"
    summary = "Fuse exported GroupNorm (+ SiLU) into canonical ai.sdgraph GroupNorm nodes"
    pattern = True
    options = (Option("silu", bool, True, "also fuse a following SiLU"),)

    def run(self, model) -> PassResult:
        graph = model.graph
        infer_shapes(model)
        b = GraphBuilder(graph)
        inorms = [n for n in graph.nodes if n.op == "InstanceNormalization"]
        near: list[tuple[str, str]] = []
        fused = with_silu = 0
        for i, node in enumerate(inorms):
            try:
                m = match_group_norm(node)
            except Mismatch as exc:
                near.append((node.name, str(exc)))
                continue
            if m.silu and not self.opts.silu:
                m = m.without_silu()
            canonical.make_node(model, m.canonical_op, [m.x, m.gamma, m.beta], [m.out],
                                {"groups": m.groups, "epsilon": m.epsilon}, f"sdgraph_groupnorm_{i}", builder=b)
            fused += 1
            with_silu += m.silu
        if fused:
            remove_dead(graph)
        for name, why in near:
            log.debug("gn near miss %s: %s", name, why)
        return PassResult(fused > 0, {"groupnorm_fused": fused, "with_silu": with_silu}, expected=len(inorms), matched=fused,
                          near_misses=near if self.debug else near[:1])
