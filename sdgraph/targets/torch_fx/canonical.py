"""sdgraph's canonical ops (``ai.sdgraph``) mapped natively: Attention(Masked) -> scaled_dot_product_attention,
GroupNorm(Silu) -> group_norm (+ silu), GeGLU -> chunk * gelu.

Other canonical ops (ToMe's merge/unmerge, ...) have no converter: the torch target inlines their
function bodies into standard ops before emission.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from sdgraph.ir.model import CANONICAL_DOMAIN
from sdgraph.targets.torch_fx._values import torch_mod
from sdgraph.targets.torch_fx.registry import converter

__all__: list[str] = []


def _sdpa(q, k, v, scale, num_heads, mask=None):
    """Canonical Attention: (B, S, H*D) inputs split to heads, or 4-D (B, H, S, D) as given."""
    torch = torch_mod()
    if q.dim() == 3 and num_heads:
        b, s, _ = q.shape
        d = q.shape[2] // num_heads
        q = q.reshape(b, s, num_heads, d).transpose(1, 2)
        k = k.reshape(b, k.shape[1], num_heads, d).transpose(1, 2)
        v = v.reshape(b, v.shape[1], num_heads, -1).transpose(1, 2)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return o.transpose(1, 2).reshape(b, s, -1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _group_norm(x, gamma, beta, groups, eps, silu):
    torch = torch_mod()
    y = torch.nn.functional.group_norm(x, groups, None, None, eps)
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    y = y * gamma.reshape(shape) + beta.reshape(shape)
    return torch.nn.functional.silu(y) if silu else y


def _geglu(x):
    h, gate = x.chunk(2, dim=-1)
    return h * torch_mod().nn.functional.gelu(gate)


def _attention_ok(n: gs.Node, opset: int) -> str | None:
    if len(n.inputs) < 3:
        return "Attention needs q, k, v inputs"
    if n.op == "AttentionMasked" and len(n.inputs) < 4:
        return "AttentionMasked needs a mask input"
    return None


def _group_norm_ok(n: gs.Node, opset: int) -> str | None:
    if "groups" not in n.attrs:
        return f"{n.op} without a 'groups' attribute"
    return None


@converter("Attention", "AttentionMasked", supports=_attention_ok, domain=CANONICAL_DOMAIN)
def attention(em, x):
    q, k, v = (em.tensor(t) for t in x.ins[:3])
    scale = float(x.attrs["scale"]) if x.attrs.get("scale") is not None else None
    return [x.tensor_out(em.call(_sdpa, q, k, v, scale, int(x.attrs.get("num_heads", 0)), em.tensor(x.input(3))))]


@converter("GroupNorm", "GroupNormSilu", supports=_group_norm_ok, domain=CANONICAL_DOMAIN)
def group_norm(em, x):
    return [x.tensor_out(em.call(_group_norm, *(em.tensor(t) for t in x.ins[:3]), int(x.attrs["groups"]),
                                 float(x.attrs.get("epsilon", 1e-5)), x.node.op == "GroupNormSilu"))]


@converter("GeGLU", domain=CANONICAL_DOMAIN)
def geglu(em, x):
    return [x.tensor_out(em.call(_geglu, em.tensor(x.ins[0])))]
