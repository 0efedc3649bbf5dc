"""lora: fold LoRA weights (diffusers/peft or kohya safetensors) into a UNet's or text encoder's initializers."""

from __future__ import annotations

import numpy as np

from sdgraph.errors import PassError, UsageError
from sdgraph.ir.lora import check_matching, folded, load_lora, match_weights
from sdgraph.limits import check
from sdgraph.passes.base import Option, Pass, PassResult, register

__all__ = ["Lora"]


@register
class Lora(Pass):
    """Fold one LoRA file into the weights: ``W' = W + scale * alpha/rank * up @ down``.

    Cases handled:
      1. diffusers/peft files (``unet.<module>.lora_A/lora_B.weight``, alphas from the file's
         ``lora_adapter_metadata``, else alpha = rank as diffusers), their older spellings
         (``lora.down/up``, ``processor.to_q_lora``), and kohya files (``lora_unet_<module>.lora_down/
         lora_up.weight`` with ``.alpha``); only the modules of the graph's role are used.
      2. Linear layers as MatMul with a pre-transposed initializer (both exporters), Gemm with
         ``transB=1`` or 0; Conv layers with 1x1 and kxk LoRA downs (1x1 ups).
      3. Each module's weight is found through the export's parameter map, then names, then shape
         and position (``sdgraph.ir.lora``); the stats count each way, unmatched modules are notes
         (``strict=true``: an error). Nothing matched at all, or a weight of another shape: bad input.
      4. Repeat the pass for several LoRAs, each with its scale: the deltas add up.
      5. An INT8 (QDQ) graph: the weight is dequantized, the delta added, and it is quantized again with
         its scales (widened per channel only where needed); activation scales keep their calibration.
    """

    name = "lora"
    summary = "Fold LoRA weights (diffusers/peft, kohya safetensors) into UNet / text encoder weights"
    exact = False  # the weights change on purpose: --verify compares against the graph before
    roles = ("unet", "text_encoder", "text_encoder_2")
    options = (
        Option("file", str, "", "the LoRA .safetensors file", positional=True),
        Option("scale", float, 1.0, "LoRA scale (diffusers' lora_scale)", min=-100, max=100),
        Option("strict", bool, False, "fail on any LoRA module of this graph's role that matches no weight"),
    )

    def requires(self, model) -> None:
        if not self.opts.file:
            raise UsageError("pass 'lora' needs file= (the LoRA .safetensors)")
        check("lora scale", self.opts.scale)
        if model.role not in self.roles:
            raise PassError(f"lora applies to a UNet or text encoder, not a model of role {model.role!r}")

    def run(self, model) -> PassResult:
        lora = load_lora(self.opts.file)
        role = model.role
        modules = lora.for_component(role)
        if not modules:
            return PassResult(modified=False, stats={"modules": 0},
                              notes=[f"{lora.path.name}: no LoRA weights for {role}"])
        matching = match_weights(model.graph, model.metadata, modules)
        check_matching(model.name, lora, role, matching, self.opts.strict)
        by_module = {m.module: m for m in modules}
        for module, ref in matching.matched.items():
            delta = by_module[module].delta(self.opts.scale, lora.rslora.get(role, False))
            values = {t.name: np.asarray(t.values) for t in ref.tensors()}
            new = ref.materialize(folded(ref.as_float(values), delta, ref.transposed), values)
            for t in ref.tensors():
                t.values = new[t.name]
        notes = [f"{module}: unmatched ({why})" for module, why in matching.unmatched.items()]
        stats = {"modules": len(modules), "matched": len(matching.matched), "unmatched": len(matching.unmatched),
                 **{f"by_{k}": v for k, v in matching.counts().items()}, "format": lora.format}
        return PassResult(modified=bool(matching.matched), stats=stats, notes=notes)
