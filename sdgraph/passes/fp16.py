"""fp16: cast weights and activations to float16 with per-role block lists and overflow checks."""

from __future__ import annotations

from sdgraph.passes._cast import CastPass
from sdgraph.passes.base import register

__all__ = ["Fp16"]


@register
class Fp16(CastPass):
    """Run the graph in float16 where it is safe, float32 elsewhere.

    Cases handled:
      1. Nodes with float32 inputs and outputs run in float16; their float32 weights are cast
         (clipped to +-65504) and Casts are placed at every float32/float16 boundary.
      2. Kept in float32: Softmax, normalizations, Pow/Exp/Log/Sqrt and reductions, the UNet's
         time embedding, non-standard domains, ``keep=`` names, and the whole VAE decoder
         (fp16 overflow is the black-image failure) unless ``force=true``.
      3. Before casting, sample inputs run with every candidate activation's max |x| probed;
         nodes above float16's range stay float32 and are listed.
      4. After casting, a NaN/Inf scan fails naming the first node that produced one.
      5. Graph inputs and outputs keep their types.
    """

    name = "fp16"
    summary = "Cast to float16 with per-role block lists, an overflow check and a NaN/Inf scan"
    kind = "fp16"
    keep_roles = ("vae_decoder",)
