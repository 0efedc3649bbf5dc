"""OpenVINO's own ops for canonical ``ai.sdgraph`` ops: ONNX frontend conversion extensions.

The ONNX frontend has no rule for model-local functions, but it takes a ``ConversionExtension``
per (domain, op): the canonical node is converted straight to OpenVINO ops built with the
``openvino.opset13`` Python API, and its function body is never looked at. Chosen over pattern
matching on the inlined graph because the canonical node already says what it is (no matcher to
keep in step with the bodies) and the result is exactly what the extension builds:

- ``Attention`` / ``AttentionMasked`` -> ``ScaledDotProductAttention`` (opset13), scale from the
  attribute, the additive mask as its float mask (zero when absent);
- ``GroupNorm`` / ``GroupNormSilu`` -> ``GroupNormalization`` (opset12) [+ ``Swish``]; gamma/beta
  go in as the op's per-channel scale/bias when they hold exactly C values, else the op runs with
  unit scale and the broadcast Mul/Add follow (same arithmetic as the function body);
- ``GeGLU`` -> ``Split`` into two halves on the last axis, ``Gelu(erf)`` on the gate, ``Multiply``.
"""

from __future__ import annotations

import math

import numpy as np

from sdgraph.ir.model import CANONICAL_DOMAIN

__all__ = ["NATIVE_OPS", "NATIVE_OV_TYPES", "extensions"]

NATIVE_OPS = frozenset({"Attention", "AttentionMasked", "GroupNorm", "GroupNormSilu", "GeGLU"})
# canonical op -> the OpenVINO op type it becomes (what a serialized artifact shows)
NATIVE_OV_TYPES = {"Attention": "ScaledDotProductAttention", "AttentionMasked": "ScaledDotProductAttention",
                   "GroupNorm": "GroupNormalization", "GroupNormSilu": "GroupNormalization", "GeGLU": "Gelu"}


def _scalar_like(value: float, like):
    import openvino.opset13 as ops

    return ops.convert_like(ops.constant(np.float32(value)), like)


def _attention(ctx):
    import openvino.opset13 as ops

    q, k, v = (ctx.get_input(i) for i in range(3))
    mask = ctx.get_input(3) if ctx.get_input_size() > 3 else _scalar_like(0.0, q)
    if ctx.has_attribute("scale"):
        scale = _scalar_like(float(ctx.get_attribute("scale")), q)
    else:  # the function's default: 1/sqrt(head dim), which is also SDPA's
        d = q.get_partial_shape()[-1]
        scale = _scalar_like(1.0 / math.sqrt(d.get_length()), q) if d.is_static else None
    return ops.scaled_dot_product_attention(q, k, v, mask, scale, causal=False).outputs()


def _group_norm(silu: bool):
    def convert(ctx):
        import openvino.opset12 as ops12
        import openvino.opset13 as ops

        x, gamma, beta = (ctx.get_input(i) for i in range(3))
        groups = int(ctx.get_attribute("groups"))
        eps = float(ctx.get_attribute("epsilon")) if ctx.has_attribute("epsilon") else 1e-5
        pshape = x.get_partial_shape()
        channels = pshape[1].get_length() if pshape.rank.is_static and pshape[1].is_static else None

        def per_channel(t) -> bool:
            # broadcast against x [N, C, ...] (aligned right): C values on x's axis 1, ones elsewhere
            s = t.get_partial_shape()
            if channels is None or not s.is_static or not pshape.rank.is_static:
                return False
            dims = [d.get_length() for d in s]
            i = 1 - (pshape.rank.get_length() - len(dims))
            return 0 <= i < len(dims) and dims[i] == channels and all(d == 1 for j, d in enumerate(dims) if j != i)

        flat = ops.constant(np.array([-1], dtype=np.int64))
        if per_channel(gamma) and per_channel(beta):
            y = ops12.group_normalization(x, ops.reshape(gamma, flat, False), ops.reshape(beta, flat, False), groups, eps)
        else:
            c = ops.gather(ops.shape_of(x), ops.constant(np.array([1], dtype=np.int64)), ops.constant(np.int64(0)))
            ones = ops.broadcast(_scalar_like(1.0, x), c)
            zeros = ops.broadcast(_scalar_like(0.0, x), c)
            y = ops.add(ops.multiply(ops12.group_normalization(x, ones, zeros, groups, eps), gamma), beta)
        if silu:
            y = ops.swish(y)
        return y.outputs()

    return convert


def _geglu(ctx):
    import openvino.opset13 as ops

    h, gate = ops.split(ctx.get_input(0), ops.constant(np.int64(-1)), 2).outputs()
    return ops.multiply(h, ops.gelu(gate, "erf")).outputs()


_CONVERTERS = {"Attention": _attention, "AttentionMasked": _attention, "GroupNorm": _group_norm(False),
               "GroupNormSilu": _group_norm(True), "GeGLU": _geglu}


def extensions() -> list:
    """One ONNX-frontend ConversionExtension per native canonical op (for ``openvino.convert_model``)."""
    from openvino.frontend.onnx import ConversionExtension

    return [ConversionExtension(op, CANONICAL_DOMAIN, fn) for op, fn in _CONVERTERS.items()]
