"""ort-contrib: lower ai.sdgraph canonical ops to the kernels ONNX Runtime's CPU provider runs fastest."""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from sdgraph.ir.canonical import inline_functions
from sdgraph.ir.model import CANONICAL_DOMAIN
from sdgraph.ir.pattern import const_value, dims, producer
from sdgraph.passes.base import Option, Pass, PassResult, register

__all__ = ["OrtContrib", "MS_DOMAIN"]

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
_BSNH_TO_BNSH = [0, 2, 1, 3]


def _to_bsd(graph: gs.Graph, t: gs.Tensor, heads: int, name: str) -> gs.Tensor:
    """[B,N,S,H] -> [B,S,N·H]: reuse the projection's [B,S,N·H] tensor when it is Reshape+Transpose'd."""
    tr = producer(t)
    if tr is not None and tr.op == "Transpose" and list(tr.attrs.get("perm", [])) == _BSNH_TO_BNSH:
        rs = producer(tr.inputs[0])
        if rs is not None and rs.op == "Reshape":
            src = rs.inputs[0]
            ss, shp = dims(src), const_value(rs.inputs[1])
            if ss is not None and len(ss) == 3 and shp is not None and shp.size == 4 and shp[2] in (heads, -1):
                return src
    mid = gs.Variable(f"{name}_bsnh", dtype=t.dtype)
    out = gs.Variable(f"{name}_bsd", dtype=t.dtype)
    graph.nodes.append(gs.Node("Transpose", f"{name}_tr", attrs={"perm": _BSNH_TO_BNSH}, inputs=[t], outputs=[mid]))
    shape = gs.Constant(f"{name}_shape", np.array([0, 0, -1], dtype=np.int64))
    graph.nodes.append(gs.Node("Reshape", f"{name}_rs", inputs=[mid, shape], outputs=[out]))
    return out


def _lower_mha(graph: gs.Graph, node: gs.Node) -> bool:
    q, k, v = node.inputs[:3]
    y = node.outputs[0]
    qs = dims(q)
    heads = int(node.attrs.get("num_heads") or (qs[1] if qs is not None and len(qs) == 4 and qs[1] else 0))
    head_dim = qs[3] if qs is not None and len(qs) == 4 else None
    if heads <= 0 or head_dim is None:
        return False
    base = node.name
    qb, kb, vb = (_to_bsd(graph, t, heads, f"{base}/{n}") for n, t in (("q", q), ("k", k), ("v", v)))
    # Output: reuse the consumer's [B,S,N·H] tensor when y only feeds Transpose(0,2,1,3) -> Reshape.
    out = None
    if len(y.outputs) == 1 and y.outputs[0].op == "Transpose" and list(y.outputs[0].attrs.get("perm", [])) == _BSNH_TO_BNSH:
        tr = y.outputs[0]
        if len(tr.outputs[0].outputs) == 1 and tr.outputs[0].outputs[0].op == "Reshape":
            rs = tr.outputs[0].outputs[0]
            os_ = dims(rs.outputs[0])
            if os_ is not None and len(os_) == 3 and os_[2] == heads * head_dim:
                out = rs.outputs[0]
                out.inputs.clear()
    if out is None:
        out = gs.Variable(f"{base}/mha_bsd", dtype=y.dtype)
        mid = gs.Variable(f"{base}/mha_bsnh", dtype=y.dtype)
        shape = gs.Constant(f"{base}/mha_shape", np.array([0, 0, heads, head_dim], dtype=np.int64))
        y.inputs.clear()
        graph.nodes.append(gs.Node("Reshape", f"{base}/mha_rs", inputs=[out, shape], outputs=[mid]))
        graph.nodes.append(gs.Node("Transpose", f"{base}/mha_tr", attrs={"perm": _BSNH_TO_BNSH}, inputs=[mid], outputs=[y]))
    node.outputs.clear()
    node.inputs.clear()
    graph.nodes.append(gs.Node("MultiHeadAttention", f"{base}/mha", domain=MS_DOMAIN,
                               attrs={"num_heads": heads, "scale": float(node.attrs.get("scale", 1.0 / np.sqrt(head_dim)))},
                               inputs=[qb, kb, vb], outputs=[out]))
    return True


def _lower_geglu_gelu(graph: gs.Graph, node: gs.Node) -> bool:
    x, y = node.inputs[0], node.outputs[0]
    xs = dims(x)
    if xs is None or xs[-1] is None or xs[-1] % 2:
        return False
    half = xs[-1] // 2
    base = node.name
    h, g, gg = (gs.Variable(f"{base}/{n}", dtype=x.dtype) for n in ("h", "g", "gelu"))
    c = lambda n, v: gs.Constant(f"{base}/{n}", np.array(v, dtype=np.int64))  # noqa: E731
    node.outputs.clear()
    node.inputs.clear()
    graph.nodes.append(gs.Node("Slice", f"{base}/slice_h", inputs=[x, c("s0", [0]), c("e0", [half]), c("ax", [-1])], outputs=[h]))
    graph.nodes.append(gs.Node("Slice", f"{base}/slice_g", inputs=[x, c("s1", [half]), c("e1", [xs[-1]]), c("ax1", [-1])], outputs=[g]))
    graph.nodes.append(gs.Node("Gelu", f"{base}/gelu", domain=MS_DOMAIN, inputs=[g], outputs=[gg]))
    graph.nodes.append(gs.Node("Mul", f"{base}/mul", inputs=[h, gg], outputs=[y]))
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
        mha = gelu = 0
        for node in list(graph.nodes):
            if node.domain != CANONICAL_DOMAIN:
                continue
            if node.op == "Attention" and self.opts.impl == "mha":
                mha += _lower_mha(graph, node)
            elif node.op == "GeGLU" and self.opts.geglu == "gelu":
                gelu += _lower_geglu_gelu(graph, node)
        if mha or gelu:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        inlined = inline_functions(model)
        return PassResult(bool(mha or gelu or inlined), {"mha": mha, "gelu": gelu, "inlined": inlined})
