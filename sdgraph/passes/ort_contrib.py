"""ort-contrib: lower ai.sdgraph canonical ops to the kernels ONNX Runtime's CPU provider runs fastest."""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from sdgraph.ir.build import GraphBuilder
from sdgraph.ir.canonical import inline_functions
from sdgraph.ir.edit import remove_dead
from sdgraph.ir.model import CANONICAL_DOMAIN
from sdgraph.ir.pattern import const_value, dims, producer
from sdgraph.passes.base import Option, Pass, PassResult, register

__all__ = ["OrtContrib", "MS_DOMAIN"]

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
_BSNH_TO_BNSH = [0, 2, 1, 3]


def _to_bsd(b: GraphBuilder, t: gs.Tensor, heads: int, name: str) -> gs.Tensor:
    """[B,N,S,H] -> [B,S,N·H]: reuse the projection's [B,S,N·H] tensor when it is Reshape+Transpose'd."""
    tr = producer(t)
    if tr is not None and tr.op == "Transpose" and list(tr.attrs.get("perm", [])) == _BSNH_TO_BNSH:
        rs = producer(tr.inputs[0])
        if rs is not None and rs.op == "Reshape":
            src = rs.inputs[0]
            ss, shp = dims(src), const_value(rs.inputs[1])
            if ss is not None and len(ss) == 3 and shp is not None and shp.size == 4 and shp[2] in (heads, -1):
                return src
    mid = b.op("Transpose", [t], name=f"{name}_tr", attrs={"perm": _BSNH_TO_BNSH}, dtype=t.dtype)
    return b.op("Reshape", [mid, np.array([0, 0, -1], dtype=np.int64)], name=f"{name}_rs", dtype=t.dtype)


def _lower_mha(b: GraphBuilder, node: gs.Node) -> bool:
    q, k, v = node.inputs[:3]
    y = node.outputs[0]
    qs = dims(q)
    heads = int(node.attrs.get("num_heads") or (qs[1] if qs is not None and len(qs) == 4 and qs[1] else 0))
    head_dim = qs[3] if qs is not None and len(qs) == 4 else None
    if heads <= 0 or head_dim is None:
        return False
    base = node.name
    qb, kb, vb = (_to_bsd(b, t, heads, f"{base}/{n}") for n, t in (("q", q), ("k", k), ("v", v)))
    # Output: reuse the consumer's [B,S,N·H] tensor when y only feeds Transpose(0,2,1,3) -> Reshape.
    out = None
    if len(y.outputs) == 1 and y.outputs[0].op == "Transpose" and list(y.outputs[0].attrs.get("perm", [])) == _BSNH_TO_BNSH:
        tr = y.outputs[0]
        if len(tr.outputs[0].outputs) == 1 and tr.outputs[0].outputs[0].op == "Reshape":
            rs = tr.outputs[0].outputs[0]
            os_ = dims(rs.outputs[0])
            if os_ is not None and len(os_) == 3 and os_[2] == heads * head_dim:
                out = rs.outputs[0]
    if out is None:
        out = b.var(f"{base}/mha_bsd", dtype=y.dtype)
        mid = b.op("Reshape", [out, np.array([0, 0, heads, head_dim], dtype=np.int64)], name=f"{base}/mha_rs", dtype=y.dtype)
        b.op("Transpose", [mid], name=f"{base}/mha_tr", attrs={"perm": _BSNH_TO_BNSH}, out=y)
    node.outputs.clear()
    node.inputs.clear()
    b.op("MultiHeadAttention", [qb, kb, vb], name=f"{base}/mha", domain=MS_DOMAIN, out=out,
         attrs={"num_heads": heads, "scale": float(node.attrs.get("scale", 1.0 / np.sqrt(head_dim)))})
    return True


def _lower_geglu_gelu(b: GraphBuilder, node: gs.Node) -> bool:
    x, y = node.inputs[0], node.outputs[0]
    xs = dims(x)
    if xs is None or xs[-1] is None or xs[-1] % 2:
        return False
    half = xs[-1] // 2
    base = node.name
    i64 = lambda v: np.array([v], dtype=np.int64)  # noqa: E731
    node.outputs.clear()
    node.inputs.clear()
    h = b.op("Slice", [x, i64(0), i64(half), i64(-1)], name=f"{base}/slice_h", dtype=x.dtype)
    g = b.op("Slice", [x, i64(half), i64(xs[-1]), i64(-1)], name=f"{base}/slice_g", dtype=x.dtype)
    gg = b.op("Gelu", [g], name=f"{base}/gelu", domain=MS_DOMAIN, dtype=x.dtype)
    b.op("Mul", [h, gg], name=f"{base}/mul", out=y)
    return True


@register
class OrtContrib(Pass):
    """Lower canonical ops for ONNX Runtime's CPU provider.

    Cases handled:
      1. ``Attention`` -> com.microsoft ``MultiHeadAttention`` on [B,S,N·H] tensors (``attention=mha``),
         reusing the projections' tensors so the head Transposes disappear; ``attention=function``
         inlines the standard-op body instead. Masked attention and unknown head counts inline.
      2. ``GeGLU`` -> Slice, Slice, com.microsoft ``Gelu``, Mul (``geglu=gelu``) or the body.
      3. ``GroupNorm``/``GroupNormSilu`` and anything left -> the standard-op body (ORT's CPU
         provider has no GroupNorm kernel; ORT fuses the body back into its own InstanceNorm path).
    The result has no ai.sdgraph nodes left.
    """

    name = "ort-contrib"
    summary = "Lower ai.sdgraph canonical ops to ONNX Runtime CPU kernels (contrib MHA, Gelu) or their bodies"
    options = (
        Option("impl", str, "mha", "attention kernel", positional=True, choices=("mha", "function")),
        Option("geglu", str, "gelu", "GeGLU lowering", choices=("gelu", "function")),
    )

    def run(self, model) -> PassResult:
        graph = model.graph
        from sdgraph.ir.shapes import infer_shapes

        infer_shapes(model)
        b = GraphBuilder(graph)
        mha = gelu = 0
        for node in list(graph.nodes):
            if node.domain != CANONICAL_DOMAIN:
                continue
            if node.op == "Attention" and self.opts.impl == "mha":
                mha += _lower_mha(b, node)
            elif node.op == "GeGLU" and self.opts.geglu == "gelu":
                gelu += _lower_geglu_gelu(b, node)
        if mha or gelu:
            remove_dead(graph)
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        inlined = inline_functions(model)
        return PassResult(bool(mha or gelu or inlined), {"mha": mha, "gelu": gelu, "inlined": inlined})
