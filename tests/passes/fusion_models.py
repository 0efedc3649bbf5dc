"""Tiny random-weight SD submodels exported by both torch exporters, cached per test session."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
import warnings
from pathlib import Path

_DIR = Path(tempfile.mkdtemp(prefix="sdgraph-fusion-models-"))
atexit.register(shutil.rmtree, _DIR, ignore_errors=True)  # a test run leaves nothing behind in /tmp

UNETS = {
    # SD 1.x: one head dim for all levels, conv projections, SDPA processor.
    "sd15": dict(attention_head_dim=8),
    # SD 2.x: heads per level, linear projections, upcast attention (Casts inside the pattern).
    "sd21": dict(attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True),
    # SDXL-like: two transformer layers per block; InstructPix2Pix-style 8 input channels.
    "sdxl8": dict(attention_head_dim=8, transformer_layers_per_block=2, use_linear_projection=True, in_channels=8),
    # Classic AttnProcessor (baddbmm, heads folded into the batch).
    "classic": dict(attention_head_dim=8),
}


def _export(module, args, path: Path, names: list[str], exporter: str) -> Path:
    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=names, opset_version=14 if exporter == "legacy" else 18,
                          dynamo=exporter == "dynamo", **({"verbose": False} if exporter == "dynamo" else {}))
    return path


@functools.cache
def unet(variant: str, exporter: str) -> Path:
    import torch
    from diffusers import UNet2DConditionModel

    cfg = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
               down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, norm_num_groups=8)
    cfg.update(UNETS[variant])
    torch.manual_seed(0)
    m = UNet2DConditionModel(**cfg).eval()
    if variant == "classic":
        from diffusers.models.attention_processor import AttnProcessor

        m.set_attn_processor(AttnProcessor())
    x = (torch.randn(1, cfg["in_channels"], 8, 8), torch.tensor([3.0]), torch.randn(1, 5, 32))
    return _export(m, x, _DIR / f"unet_{variant}_{exporter}.onnx", ["sample", "timestep", "encoder_hidden_states"], exporter)


@functools.cache
def text_encoder(exporter: str) -> Path:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                         max_position_embeddings=16, eos_token_id=2, bos_token_id=1, pad_token_id=1)
    m = CLIPTextModel(cfg).eval()
    return _export(m, (torch.randint(0, 99, (1, 16)),), _DIR / f"clip_{exporter}.onnx", ["input_ids"], exporter)


@functools.cache
def vae_decoder(exporter: str) -> Path:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, layers_per_block=1).eval()

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = vae

        def forward(self, z):
            return self.vae.decode(z).sample

    return _export(Decoder(), (torch.randn(1, 4, 8, 8),), _DIR / f"vae_{exporter}.onnx", ["latent_sample"], exporter)
