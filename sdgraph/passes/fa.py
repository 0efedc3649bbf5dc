"""fa: fuse every scaled-dot-product attention into one canonical ai.sdgraph Attention node."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_graphsurgeon as gs

from sdgraph.ir import canonical
from sdgraph.ir.build import GraphBuilder
from sdgraph.ir.edit import remove_dead
from sdgraph.ir.pattern import Mismatch, const_value, producer, scalar, single_consumer, skip_identity_casts
from sdgraph.ir.shapes import infer_shapes
from sdgraph.passes.base import Option, Pass, PassResult, register

__all__ = ["FuseAttention", "AttentionMatch", "match_attention", "LAYOUTS"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class AttentionMatch:
    """One matched attention: y = softmax(q·ktᵀ... · scale [+ mask]) · v, written to ``out``.

    ``kt`` is the key as the graph has it (already transposed); ``scale`` gathers every constant
    Mul/Div on the scores, the query and the key. Filled in while matching.
    """

    q: gs.Tensor | None = None
    kt: gs.Tensor | None = None
    v: gs.Tensor | None = None
    mask: gs.Tensor | None = None
    scale: float = 1.0
    out: gs.Tensor | None = None

    @property
    def canonical_op(self) -> str:
        return "AttentionMasked" if self.mask is not None else "Attention"

    @property
    def rank(self) -> int:
        return len(self.q.shape)


@dataclasses.dataclass(frozen=True)
class Layout:
    """A heads layout the matcher accepts, and how the rewrite maps it to canonical [B,H,S,D]."""

    name: str
    wrap: bool  # True: Unsqueeze q/k/v on axis 0 before, Squeeze after


# Pattern variants as data: the query ranks fa fuses (any other rank is a near miss).
LAYOUTS = {4: Layout("[B,H,S,D]", wrap=False), 3: Layout("[B·H,S,D] (heads in batch)", wrap=True)}


def _one_element(t: gs.Tensor) -> bool:
    return t.shape is not None and all(isinstance(d, int) for d in t.shape) and int(np.prod(t.shape)) == 1


def _peel_scale(t: gs.Tensor, m: AttentionMatch, what: str) -> gs.Tensor:
    """Walk back through identity Casts and Mul/Div by a constant scalar, folding them into m.scale."""
    while True:
        t, _ = skip_identity_casts(t)
        node = producer(t)
        if node is None or node.op not in ("Mul", "Div"):
            return t
        a, b = node.inputs
        sa, sb = scalar(a), scalar(b)
        if sb is not None:
            m.scale = m.scale * sb if node.op == "Mul" else m.scale / sb
            t = a
        elif sa is not None and node.op == "Mul":
            m.scale *= sa
            t = b
        elif _one_element(b) or node.op == "Mul" and _one_element(a):
            raise Mismatch(f"{what} scale {node.name} is not a constant (run fold first)")
        else:
            return t


def match_attention(softmax: gs.Node) -> AttentionMatch:
    """Match the attention around ``softmax``; raise Mismatch with the reason if it is not one.

    Cases handled:
      1. softmax(Q·Kᵀ · s) · V with s a constant Mul or Div after the MatMul (legacy SDPA, classic
         AttnProcessor's baddbmm/bmm, VAE attention).
      2. Scale split onto Q and K as two Mul by √s each (torch SDPA decomposition, both exporters).
      3. An additive mask between the scaling and the Softmax (CLIP's causal mask, any in-graph mask).
      4. Casts that keep the dtype (upcast_attention in an fp32 model) anywhere on the Q/K/scores path.
      5. Heads layout [B, H, S, D] (rank 4) or heads folded into batch [B·H, S, D] (rank 3).
    """
    m = AttentionMatch()
    axis = softmax.attrs.get("axis", -1)
    x = softmax.inputs[0]
    rank = len(x.shape) if x.shape is not None else None
    if axis != -1 and (rank is None or axis != rank - 1):
        raise Mismatch(f"Softmax axis {axis} is not the last axis")
    t = _peel_scale(x, m, "scores")
    node = producer(t)
    if node is not None and node.op == "Add":
        a, b = node.inputs
        pa, pb = producer(a), producer(b)
        chain_a = pa is not None and pa.op in ("MatMul", "Mul", "Div", "Cast")
        chain_b = pb is not None and pb.op in ("MatMul", "Mul", "Div", "Cast")
        if chain_a and not chain_b or chain_a and chain_b and pa.op == "MatMul":
            t, m.mask = a, b
        elif chain_b:
            t, m.mask = b, a
        else:
            raise Mismatch("Softmax input is an Add with no Q·Kᵀ operand")
        mv = const_value(m.mask)
        if mv is not None and not mv.any():
            m.mask = None  # Add of zeros (baddbmm's beta·input with an empty input)
        scale_before = m.scale
        t = _peel_scale(t, m, "scores")
        if m.mask is not None and m.scale != scale_before:
            raise Mismatch("the mask is added before the scaling; canonical Attention adds it after")
    node = producer(t)
    if node is None or node.op != "MatMul":
        raise Mismatch(f"Softmax input does not come from a MatMul (found {node.op if node else 'a graph input'})")
    if len(t.outputs) != 1:
        raise Mismatch("Q·Kᵀ is used outside the attention")
    q, kt = node.inputs
    m.q = _peel_scale(q, m, "query")
    m.kt = _peel_scale(kt, m, "key")
    # Forward: Softmax -> (identity Casts) -> MatMul(P, V)
    p = softmax.outputs[0]
    while True:
        users = {n.op: n for n in p.outputs}
        if len(p.outputs) == 2 and set(users) == {"IsNaN", "Where"}:
            # dynamo's masked SDPA: Where(IsNaN(P), 0, P) zeroes fully masked rows. Canonical
            # Attention differs only when every key of a row is masked with -inf.
            isnan, where = users["IsNaN"], users["Where"]
            zero = const_value(where.inputs[1])
            if where.inputs[0] is not isnan.outputs[0] or where.inputs[2] is not p or zero is None or zero.any():
                raise Mismatch("Softmax output feeds an IsNaN/Where that is not the NaN guard")
            p = where.outputs[0]
            continue
        user = single_consumer(p, ("Cast", "MatMul"))
        if user.op == "Cast":
            if user.outputs[0].dtype is not None and p.dtype is not None and np.dtype(user.outputs[0].dtype) != np.dtype(p.dtype):
                raise Mismatch(f"Cast {user.name} after Softmax changes the dtype")
            p = user.outputs[0]
            continue
        break
    if user.inputs[0] is not p:
        raise Mismatch("probabilities are the right operand of the output MatMul")
    m.v, m.out = user.inputs[1], user.outputs[0]
    qr = len(m.q.shape) if m.q.shape is not None else None
    if qr not in LAYOUTS:
        raise Mismatch(f"query rank is {qr}; expected " + " or ".join(f"{r} ({lay.name})" for r, lay in LAYOUTS.items()))
    for name, tensor in (("key", m.kt), ("value", m.v)):
        if tensor.shape is not None and len(tensor.shape) != qr:
            raise Mismatch(f"{name} rank {len(tensor.shape)} differs from the query's {qr}")
    if not np.isfinite(m.scale) or m.scale == 0:
        raise Mismatch(f"scale {m.scale} is not usable")
    return m


def _untranspose_key(b: GraphBuilder, kt: gs.Tensor, rank: int, name: str) -> gs.Tensor:
    """K from Kᵀ: reuse the Transpose's input when possible, else insert a Transpose."""
    node = producer(kt)
    last_swap = list(range(rank - 2)) + [rank - 1, rank - 2]
    if node is not None and node.op == "Transpose":
        perm = list(node.attrs.get("perm", []))
        if perm == last_swap:
            return node.inputs[0]
        if rank == 4 and perm == [0, 2, 3, 1]:
            return b.op("Transpose", [node.inputs[0]], name=f"{name}/key_t", attrs={"perm": [0, 2, 1, 3]}, dtype=kt.dtype)
    return b.op("Transpose", [kt], name=f"{name}/key_t", attrs={"perm": last_swap}, dtype=kt.dtype)


def _heads(t: gs.Tensor) -> int:
    if t.shape is not None and len(t.shape) == 4 and isinstance(t.shape[1], int):
        return int(t.shape[1])
    return 0


@register
class FuseAttention(Pass):
    """Fuse scaled-dot-product attention into ``ai.sdgraph.Attention`` (or ``AttentionMasked``).

    Cases handled (see ``match_attention``):
      1. Self- and cross-attention of SD 1.x/2.x/XL UNets, the VAE mid-block and the CLIP text
         encoder, from torch's legacy (opset 14-17) and dynamo (opset 18+) exporters, with the
         default SDPA processor or the classic AttnProcessor.
      2. Scale after Q·Kᵀ or split onto Q and K; identity upcast Casts; an additive mask.
      3. Heads-in-batch rank-3 attention is wrapped in Unsqueeze/Squeeze to the canonical [B,H,S,D].
    Expected = Softmax nodes; every unmatched one is a near miss with its reason.
    """

    name = "fa"
    summary = "Fuse scaled-dot-product attention into canonical ai.sdgraph Attention nodes"
    pattern = True
    options = (
        Option("impl", str, "canonical", "form of the fused node (canonical ai.sdgraph function)", choices=("canonical",)),
        Option("include", list, [], "only fuse attentions whose Softmax node name contains one of these"),
        Option("exclude", list, [], "skip attentions whose Softmax node name contains one of these"),
    )

    def run(self, model) -> PassResult:
        graph = model.graph
        infer_shapes(model)
        b = GraphBuilder(graph)
        softmaxes = [n for n in graph.nodes if n.op == "Softmax"]
        near: list[tuple[str, str]] = []
        fused = masked = rank3 = skipped = 0
        for i, sm in enumerate(softmaxes):
            if self.opts.include and not any(s in sm.name for s in self.opts.include) or any(s in sm.name for s in self.opts.exclude):
                skipped += 1
                continue
            try:
                m = match_attention(sm)
            except Mismatch as exc:
                near.append((sm.name, str(exc)))
                continue
            base = f"sdgraph_attention_{i}"
            layout = LAYOUTS[m.rank]
            k = _untranspose_key(b, m.kt, m.rank, base)
            q, v, out = m.q, m.v, m.out
            if layout.wrap:
                axis0 = np.array([0], dtype=np.int64)
                q, k, v = (b.op("Unsqueeze", [t, axis0], name=f"{base}/{n}4_unsq", dtype=t.dtype)
                           for n, t in (("q", q), ("k", k), ("v", v)))
                out = b.var(f"{base}/y4", dtype=m.out.dtype)
                rank3 += 1
            inputs = [q, k, v] + ([m.mask] if m.mask is not None else [])
            canonical.make_node(model, m.canonical_op, inputs, [out], {"scale": float(m.scale), "num_heads": _heads(q)},
                                base, builder=b)
            if layout.wrap:
                b.op("Squeeze", [out, np.array([0], dtype=np.int64)], name=f"{base}/squeeze", out=m.out)
            fused += 1
            masked += m.mask is not None
        if fused:
            remove_dead(graph)
        stats = {"attention_fused": fused, "masked": masked, "heads_in_batch": rank3}
        if skipped:
            stats["excluded"] = skipped
        for name, why in near:
            log.debug("fa near miss %s: %s", name, why)
        return PassResult(fused > 0, stats, expected=len(softmaxes) - skipped, matched=fused,
                          near_misses=near if self.debug else near[:1])
