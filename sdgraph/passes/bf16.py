"""bf16: cast weights and activations to bfloat16 with per-role block lists and a NaN scan."""

from __future__ import annotations

from sdgraph.passes._cast import CastPass
from sdgraph.passes.base import register

__all__ = ["Bf16"]


@register
class Bf16(CastPass):
    """Run the graph in bfloat16 where it is safe, float32 elsewhere.

    Cases handled:
      1. Nodes with float32 inputs and outputs run in bfloat16; their weights are cast and Casts
         are placed at every float32/bfloat16 boundary.
      2. Kept in float32: Softmax, normalizations, Pow/Exp/Log/Sqrt and reductions, the UNet's
         time embedding, non-standard domains and ``keep=`` names.
      3. bfloat16 has float32's range, so the overflow check only flags values beyond it; the
         NaN/Inf scan after casting fails naming the first node that produced one.
      4. Graph inputs and outputs keep their types. ONNX Runtime's CPU provider lacks bfloat16
         kernels for Conv/MatMul, so the scan (and users) run these graphs in OpenVINO.
    """

    name = "bf16"
    summary = "Cast to bfloat16 with per-role block lists and a NaN/Inf scan (runs in OpenVINO)"
    kind = "bf16"
