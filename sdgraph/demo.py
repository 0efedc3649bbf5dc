"""Random-weight Stable Diffusion pipelines built from configs: tiny ones for tests, full-size for benchmarks."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

from sdgraph.errors import TargetUnavailable, UsageError

__all__ = [
    "ARCHS",
    "SIZES",
    "TINY_VOCAB",
    "build_demo_pipeline",
    "build_demo_vae",
    "build_demo_controlnet",
    "clip_bpe",
    "make_clip_tokenizer",
]

log = logging.getLogger(__name__)

ARCHS = ("sd15", "sd21", "sdxl", "pix2pix", "turbo")
# turbo: the SDXL architecture with SDXL-Turbo's scheduler config (1 step, trailing spacing, guidance 0)
_BASE_ARCH = {"turbo": "sdxl"}
# How each arch is meant to be sampled (recorded in sdgraph_demo.json).
SAMPLING = {"turbo": {"steps": 1, "guidance": 0.0, "timestep_spacing": "trailing"}}
SIZES = ("tiny", "full")
REAL_CLIP_VOCAB = 49408  # the real CLIP BPE vocabulary size; full-size text encoders keep it
TINY_VOCAB = 2048  # the generated vocabulary: every corpus word below becomes one token

# Words the generated BPE vocabulary is learned from: the kind of text prompts carry. Any text still
# tokenizes (every byte is in the vocabulary); these words just come out as few tokens.
_CORPUS = """
a an the of on in with and at by from to for under over near into through behind beside
photo photograph picture painting drawing sketch illustration render portrait landscape
closeup close up wide angle shot view scene still life concept art digital oil watercolor
astronaut riding horse mars moon space planet star galaxy nebula sky cloud clouds sun sunset
sunrise night day light lights lighting shadow shadows cinematic dramatic soft warm cold
red green blue yellow orange purple pink black white gray grey golden silver brown colorful
bicycle car train boat ship plane city street road bridge house building castle tower temple
forest tree trees flower flowers garden field mountain mountains river lake sea ocean beach
island desert snow rain storm fog water fire ice stone rock sand grass leaves autumn winter
spring summer cat dog bird fish lion tiger wolf fox bear rabbit dragon robot knight wizard
woman man girl boy child people person face eyes hair smile dress hat coat armor sword
beautiful detailed highly intricate sharp focus high quality masterpiece best realistic
photorealistic hyperrealistic trending artstation unreal engine octane studio ghibli style
anime cartoon vintage retro futuristic cyberpunk steampunk fantasy magical epic tiny huge
small large old new young ancient modern standing sitting running flying walking reading
holding wearing looking eating playing sleeping smiling floating glowing shining burning
table chair window door room kitchen library cafe market street lamp book cup coffee tea
apple cake bread pizza food fruit wine glass mirror clock candle lantern map letter
turn make change add remove replace into it them him her their its this that two three
""".split()


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) byte -> printable-unicode table that byte-level BPE works on."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clip_bpe(vocab_size: int = TINY_VOCAB) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level CLIP BPE vocabulary of ``vocab_size`` tokens, learned from a built-in corpus.

    Laid out exactly like CLIP's: the 256 byte symbols, the same with ``</w>``, one token per merge,
    then ``<|startoftext|>`` and ``<|endoftext|>`` last (so end-of-text has the largest id, as in
    CLIP, and argmax pooling finds it). Deterministic: ties between pairs break alphabetically.
    """
    byte_syms = list(_bytes_to_unicode().values())
    base = byte_syms + [s + "</w>" for s in byte_syms]
    n_merges = vocab_size - len(base) - 2
    if n_merges < 0:
        raise UsageError(f"vocab_size {vocab_size} is below the {len(base) + 2} tokens every byte-level CLIP vocabulary has")
    b2u = _bytes_to_unicode()
    words: Counter[tuple[str, ...]] = Counter()
    for w in _CORPUS:
        syms = [b2u[b] for b in w.lower().encode("utf-8")]
        syms[-1] += "</w>"
        words[tuple(syms)] += 1
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for syms, cnt in words.items():
            for a, b in zip(syms, syms[1:]):
                pairs[(a, b)] += cnt
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        new_words: Counter[tuple[str, ...]] = Counter()
        for syms, cnt in words.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            new_words[tuple(out)] += cnt
        words = new_words
    # The corpus ran out: pad with merges of existing tokens and a letter (keeps vocab_size exact).
    tokens = list(dict.fromkeys(base + [a + b for a, b in merges]))
    seen = set(tokens)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    lefts = iter([t for t in tokens if not t.endswith("</w>")])
    while len(tokens) < vocab_size - 2:
        left = next(lefts)
        for right in letters + [c + "</w>" for c in letters]:
            if len(tokens) >= vocab_size - 2:
                break
            if left + right not in seen:
                merges.append((left, right))
                tokens.append(left + right)
                seen.add(left + right)
    tokens = tokens[: vocab_size - 2] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [m for m in merges if m[0] + m[1] in vocab]
    return vocab, merges


def make_clip_tokenizer(vocab_size: int = TINY_VOCAB, out_dir: str | os.PathLike | None = None):
    """A working ``CLIPTokenizer`` over :func:`clip_bpe`; also saved to ``out_dir`` when given.

    The saved folder holds ``tokenizer.json`` plus CLIP's own ``vocab.json`` / ``merges.txt``, so
    both transformers and tools that read the classic files can load it.
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe(vocab_size)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    if out_dir is not None:
        tok.save_pretrained(out_dir)
        _write_bpe_files(Path(out_dir), vocab_size)
    return tok


def _write_bpe_files(out: Path, vocab_size: int) -> None:
    vocab, merges = clip_bpe(vocab_size)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")


# --------------------------------------------------------------------------- configs
# Full sizes are the published architectures (SD 1.5, SD 2.1-768-v, SDXL base, InstructPix2Pix).
# Tiny ones keep each family's distinguishing features at toy widths.

_TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                  max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu")
_TEXT = {
    ("sd15", "full"): dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                           projection_dim=768, hidden_act="quick_gelu"),
    ("sd21", "full"): dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                           projection_dim=512, hidden_act="gelu"),
    ("sdxl", "full"): dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                           projection_dim=768, hidden_act="quick_gelu"),
    ("sdxl2", "full"): dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                            projection_dim=1280, hidden_act="gelu"),
    ("sd21", "tiny"): dict(_TINY_TEXT, hidden_act="gelu"),
    ("sdxl2", "tiny"): dict(_TINY_TEXT, hidden_size=32, projection_dim=32, hidden_act="gelu"),
}
_TEXT[("pix2pix", "full")] = _TEXT[("sd15", "full")]

_SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
_TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8,
)
_UNET = {
    ("sd15", "full"): _SD15_UNET,
    ("pix2pix", "full"): dict(_SD15_UNET, in_channels=8),
    ("sd21", "full"): dict(_SD15_UNET, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                           use_linear_projection=True, upcast_attention=True),
    ("sdxl", "full"): dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, norm_num_groups=32,
    ),
    ("sd15", "tiny"): _TINY_UNET,
    ("pix2pix", "tiny"): dict(_TINY_UNET, in_channels=8),
    ("sd21", "tiny"): dict(_TINY_UNET, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True),
    # Like SDXL: no attention at the top level, two transformer layers per block below it.
    ("sdxl", "tiny"): dict(
        _TINY_UNET, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4), cross_attention_dim=64, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    ),
}

_VAE = {
    "full": dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                 block_out_channels=(128, 256, 512, 512), norm_num_groups=32,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
    # Four levels like the real VAE (8x downsampling), at toy widths.
    "tiny": dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=128,
                 block_out_channels=(16, 16, 32, 32), norm_num_groups=8,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
}
_TAESD = {
    "full": dict(),  # diffusers' defaults are TAESD's published architecture
    "tiny": dict(encoder_block_out_channels=(16, 16, 16, 16), decoder_block_out_channels=(16, 16, 16, 16),
                 num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1)),
}

_SCHED_BASE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _scheduler(arch: str):
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, PNDMScheduler

    if arch == "sd15":
        return PNDMScheduler(**_SCHED_BASE, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    if arch == "sd21":
        return DDIMScheduler(**_SCHED_BASE, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                             prediction_type="v_prediction")
    if arch == "sdxl":
        return EulerDiscreteScheduler(**_SCHED_BASE, steps_offset=1, timestep_spacing="leading")
    if arch == "turbo":  # stabilityai/sdxl-turbo's scheduler_config.json
        return EulerAncestralDiscreteScheduler(**_SCHED_BASE, steps_offset=1, timestep_spacing="trailing")
    return EulerAncestralDiscreteScheduler(**_SCHED_BASE)


def _check(arch: str, size: str) -> None:
    if arch not in ARCHS:
        raise UsageError(f"unknown demo arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if size not in SIZES:
        raise UsageError(f"unknown demo size {size!r}; choose one of {', '.join(SIZES)}")


def _text_encoder(key: tuple[str, str], vocab_size: int, tok, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = dict(_TEXT.get(key) or _TINY_TEXT)
    config = CLIPTextConfig(
        vocab_size=vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **cfg,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def _components(arch: str, size: str, seed: int) -> dict:
    """Build every component of a demo pipeline; ``seed`` fixes all random weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    tok = make_clip_tokenizer(TINY_VOCAB)
    # Full-size encoders keep CLIP's 49,408-row embedding (real parameter count); the generated
    # tokenizer only ever produces ids below TINY_VOCAB, all of which exist there.
    vocab_size = REAL_CLIP_VOCAB if size == "full" else TINY_VOCAB
    base = _BASE_ARCH.get(arch, arch)
    comps: dict = {}
    torch.manual_seed(seed)
    comps["unet"] = UNet2DConditionModel(**_UNET[(base, size)]).eval()
    torch.manual_seed(seed + 1)
    comps["vae"] = AutoencoderKL(**_VAE[size], scaling_factor=0.13025 if base == "sdxl" else 0.18215).eval()
    torch.manual_seed(seed + 2)
    comps["text_encoder"] = _text_encoder((base, size), vocab_size, tok, with_projection=False)
    comps["tokenizer"] = tok
    if base == "sdxl":
        torch.manual_seed(seed + 3)
        comps["text_encoder_2"] = _text_encoder(("sdxl2", size), vocab_size, tok, with_projection=True)
        comps["tokenizer_2"] = tok
    comps["scheduler"] = _scheduler(arch)
    return comps


def build_demo_pipeline(out_dir: str | os.PathLike, arch: str = "sd15", size: str = "tiny", seed: int = 0,
                        force: bool = False, controlnet: bool = False) -> Path:
    """Save a random-weight diffusers pipeline of ``arch`` at ``size`` to ``out_dir``; return the path.

    Nothing is downloaded: every component is built from a config. The output is written to a
    temporary sibling and renamed into place, so a failed build leaves nothing behind. With
    ``controlnet`` the pipeline is diffusers' (XL) ControlNet pipeline with a random-weight
    ``controlnet/`` (:func:`demo_controlnet`).
    """
    _check(arch, size)
    if controlnet:
        return _build_controlnet_pipeline(Path(out_dir), arch, size, seed, force)
    try:
        from diffusers import (StableDiffusionInstructPix2PixPipeline, StableDiffusionPipeline,
                               StableDiffusionXLPipeline)
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise TargetUnavailable(f"demo-model needs the export extra ({exc.name} missing): pip install 'sdgraph[export]'") from None
    from sdgraph.ir.modeldir import ModelDir

    out = Path(out_dir)
    with ModelDir.create(out, force=force) as new:  # a diffusers pipeline folder, committed the same way
        tmp = new.path
        comps = _components(arch, size, seed)
        if _BASE_ARCH.get(arch, arch) == "sdxl":
            pipe = StableDiffusionXLPipeline(**comps)
        else:
            cls = StableDiffusionInstructPix2PixPipeline if arch == "pix2pix" else StableDiffusionPipeline
            pipe = cls(**comps, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(tmp, safe_serialization=True)
        for name in ("tokenizer", "tokenizer_2"):
            if name in comps:  # also the classic vocab.json / merges.txt
                _write_bpe_files(tmp / name, len(comps[name]))
        (tmp / "sdgraph_demo.json").write_text(json.dumps(
            {"arch": arch, "size": size, "seed": seed, "random_weights": True, **({"sampling": SAMPLING[arch]}
                                                                                  if arch in SAMPLING else {}),
             "tokenizer": "byte-level CLIP BPE generated by sdgraph.demo.clip_bpe (not the real CLIP vocabulary)"},
            indent=2) + "\n")
    log.info("demo %s/%s pipeline written to %s", arch, size, out)
    return out


# --------------------------------------------------------------------------- ControlNet
# The conditioning embedding downsamples the control image by 2 ** (len - 1) = 8, the VAE's factor.
_CN_EMBED = {"tiny": (8, 8, 16, 16), "full": (16, 32, 96, 256)}


def demo_controlnet(unet, size: str = "tiny", seed: int = 0):
    """A random-weight ``ControlNetModel`` for ``unet`` (diffusers' ``from_unet`` layout).

    ``from_unet`` copies the UNet's encoder and zero-initializes the zero convolutions, so its
    residuals would all be 0 and no test could see them: here every weight, zero convolutions
    included, is drawn from a seeded normal distribution (scaled to keep the residuals O(1)).
    """
    import torch
    from diffusers import ControlNetModel

    torch.manual_seed(seed + 4)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=_CN_EMBED[size],
                                   load_weights_from_unet=False).eval()
    gen = torch.Generator().manual_seed(seed + 5)
    with torch.no_grad():
        for block in list(cn.controlnet_down_blocks) + [cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]:
            fan_in = block.weight[0].numel()
            block.weight.copy_(torch.randn(block.weight.shape, generator=gen) / fan_in ** 0.5)
            block.bias.copy_(torch.randn(block.bias.shape, generator=gen) * 0.02)
    return cn


def _build_controlnet_pipeline(out: Path, arch: str, size: str, seed: int, force: bool) -> Path:
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    from sdgraph.ir.modeldir import ModelDir

    if arch == "pix2pix":
        raise UsageError("--controlnet: diffusers has no InstructPix2Pix ControlNet pipeline; use sd15, sd21, sdxl or turbo")
    with ModelDir.create(out, force=force) as new:  # a diffusers pipeline folder, committed the same way
        tmp = new.path
        comps = _components(arch, size, seed)
        comps["controlnet"] = demo_controlnet(comps["unet"], size, seed)
        if _BASE_ARCH.get(arch, arch) == "sdxl":
            pipe = StableDiffusionXLControlNetPipeline(**comps, add_watermarker=False)
        else:
            pipe = StableDiffusionControlNetPipeline(**comps, safety_checker=None, feature_extractor=None,
                                                     requires_safety_checker=False)
        pipe.save_pretrained(tmp, safe_serialization=True)
        for name in ("tokenizer", "tokenizer_2"):
            if name in comps:
                _write_bpe_files(tmp / name, len(comps[name]))
        (tmp / "sdgraph_demo.json").write_text(json.dumps(
            {"arch": arch, "size": size, "seed": seed, "random_weights": True, "controlnet": True,
             **({"sampling": SAMPLING[arch]} if arch in SAMPLING else {}),
             "tokenizer": "byte-level CLIP BPE generated by sdgraph.demo.clip_bpe (not the real CLIP vocabulary)"},
            indent=2) + "\n")
    log.info("demo %s/%s ControlNet pipeline written to %s", arch, size, out)
    return out


def build_demo_controlnet(out_dir: str | os.PathLike, arch: str = "sd15", size: str = "tiny", seed: int = 0,
                          force: bool = False) -> Path:
    """Save only a random-weight ``ControlNetModel`` (for ``sdgraph export --controlnet DIR``) matching the
    UNet of the ``arch`` demo pipeline built with the same ``seed``."""
    _check(arch, size)
    if arch == "pix2pix":
        raise UsageError("--controlnet: diffusers has no InstructPix2Pix ControlNet; use sd15, sd21, sdxl or turbo")
    import torch
    from diffusers import UNet2DConditionModel

    from sdgraph.ir.outputs import atomic_dir

    with atomic_dir(Path(out_dir), force=force) as tmp:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**_UNET[(_BASE_ARCH.get(arch, arch), size)]).eval()
        demo_controlnet(unet, size, seed).save_pretrained(tmp, safe_serialization=True)
    return Path(out_dir)


def build_demo_vae(out_dir: str | os.PathLike, kind: str = "taesd", size: str = "tiny", seed: int = 0,
                   force: bool = False) -> Path:
    """Save a random-weight VAE (``taesd``: diffusers' ``AutoencoderTiny``) to ``out_dir`` for ``--vae``."""
    if kind != "taesd":
        raise UsageError(f"unknown demo vae {kind!r}; the only one is 'taesd'")
    if size not in SIZES:
        raise UsageError(f"unknown demo size {size!r}; choose one of {', '.join(SIZES)}")
    import torch
    from diffusers import AutoencoderTiny

    from sdgraph.ir.outputs import atomic_dir

    with atomic_dir(Path(out_dir), force=force) as tmp:
        torch.manual_seed(seed)
        AutoencoderTiny(**_TAESD[size]).eval().save_pretrained(tmp, safe_serialization=True)
    return Path(out_dir)


def check_demo_name(name: str) -> None:
    """Raise a one-line error for a demo name that is neither a pipeline arch nor ``taesd``."""
    if name not in ARCHS and name != "taesd":
        raise UsageError(f"unknown demo arch {name!r}; choose one of {', '.join(ARCHS)}, taesd")
