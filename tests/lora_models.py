"""Tiny random LoRAs for the tiny pipelines, made with peft and saved with diffusers (nothing downloaded).

``make_lora(pipeline_dir, out, ...)`` adds a peft ``LoraConfig`` adapter to the pipeline's UNet and text
encoder, gives ``lora_B`` random values (peft initializes it to zero: the LoRA would change nothing),
and saves it with ``StableDiffusionPipeline.save_lora_weights``; ``kohya=True`` rewrites the same
weights with kohya's key names and ``.alpha`` tensors. ``fused_pipeline`` is the reference: the
diffusers pipeline with ``load_lora_weights`` + ``fuse_lora``.
"""

from __future__ import annotations

from pathlib import Path

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


def make_lora(pipeline_dir: Path, out: Path, *, rank: int = 4, alpha: float = 8.0, seed: int = 0, kohya: bool = False,
              unet_targets=UNET_TARGETS, text_targets=TEXT_TARGETS, strength: float = 0.2) -> Path:
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir / "unet")
    te = CLIPTextModel.from_pretrained(pipeline_dir / "text_encoder")
    layers, configs = {}, {}
    for model, targets, name in ((unet, unet_targets, "unet"), (te, text_targets, "text_encoder")):
        if not targets:
            continue
        # peft directly: transformers' add_adapter wants a newer peft than the package index has
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)
        inject_adapter_in_model(config, model)
        configs[name] = config.to_dict()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_" in pname:
                    p.copy_(torch.randn_like(p) * strength)
        layers[name] = get_peft_model_state_dict(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {f"{name}_lora_adapter_metadata": cfg for name, cfg in configs.items()}
    if not kohya:
        StableDiffusionPipeline.save_lora_weights(out.parent, unet_lora_layers=layers.get("unet"),
                                                  text_encoder_lora_layers=layers.get("text_encoder"),
                                                  weight_name=out.name, **meta)
        return out
    from safetensors.torch import save_file

    sd = {}
    for comp, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_")):
        for key, v in layers.get(comp, {}).items():
            if ".lora_A." not in key:
                continue
            module = key.split(".lora_A.")[0]
            name = prefix + module.replace(".", "_")
            sd[f"{name}.lora_down.weight"] = v.contiguous()
            sd[f"{name}.lora_up.weight"] = layers[comp][key.replace(".lora_A.", ".lora_B.")].contiguous()
            sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(sd, str(out))
    return out


def fused_pipeline(pipeline_dir: Path, loras: list[tuple[Path, float]]):
    """The diffusers reference: every LoRA loaded as its own adapter and fused at its scale."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, safety_checker=None, requires_safety_checker=False)
    for i, (path, scale) in enumerate(loras):
        pipe.load_lora_weights(path.parent, weight_name=path.name, adapter_name=f"a{i}")
        pipe.fuse_lora(lora_scale=scale, adapter_names=[f"a{i}"])
    pipe.unload_lora_weights()
    return pipe
