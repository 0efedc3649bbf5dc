"""run/bench/verify beyond batch 1 at 8x: batch-2 exports (CFG in one call), the VAE's own scale factor,
Turbo (trailing timesteps, guidance 0, img2img strength) and --image on bench/verify (InstructPix2Pix)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdgraph.cli import app
from sdgraph.errors import UsageError
from sdgraph.pipeline.runner import open_pipeline


pytestmark = pytest.mark.slow  # extra exports (batch 2, two-block VAE, turbo) and end-to-end runs

def _cli(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    res.text = " ".join(res.output.split())  # the console wraps long lines
    return res


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


# ----------------------------------------------------------------------------- item 7: batch-2 exports
@pytest.mark.slow  # a second export of the tiny pipeline (batch 2)
def test_batch2_export_runs_guidance_in_one_call(tiny_onnx, tmp_path):
    b1, b2 = tiny_onnx("sd15"), tiny_onnx("sd15", batch=2)
    pipe = open_pipeline(b2)
    assert pipe._static_dim(pipe.unet, "sample", 0) == 2
    g = pipe.generate("a red bicycle", steps=3, seed=4)
    # one text-encoder call for [uncond, cond], one batch-2 UNet call per step
    n = len(g.timesteps)  # (the demo's PNDM scheduler runs steps + 1 model calls)
    assert g.stats["text_encoder"]["calls"] == 1 and g.stats["unet"]["calls"] == n >= 3
    g1 = open_pipeline(b1).generate("a red bicycle", steps=3, seed=4)
    assert g1.stats["unet"]["calls"] == 2 * n and g1.stats["text_encoder"]["calls"] == 2  # batch 1: apart
    assert np.abs(np.asarray(g.images[0], np.int16) - np.asarray(g1.images[0], np.int16)).max() <= 1
    # the CLI as a user types it; guidance 0 (one row) is padded to the export's batch of 2
    for name, d in (("b1", b1), ("b2", b2)):
        res = _cli("run", d, "-p", "a red bicycle", "--steps", 2, "--seed", 9, "-o", tmp_path / f"{name}.png")
        assert res.exit_code == 0, res.output
    assert np.abs(_pixels(tmp_path / "b1.png") - _pixels(tmp_path / "b2.png")).max() <= 1
    res = _cli("run", b2, "-p", "x", "--steps", 1, "--guidance", 0, "-o", tmp_path / "g0.png")
    assert res.exit_code == 0, res.output
    assert _pixels(tmp_path / "g0.png").shape == (128, 128, 3)


# ----------------------------------------------------------------------------- issue 15: VAE scale factor
@pytest.fixture(scope="module")
def two_block_vae_export(tiny_pipeline, tmp_path_factory):
    """The tiny SD1.5 UNet (16x16 latents) with a 2-block AutoencoderKL: scale factor 2, 32x32 images."""
    import torch
    from diffusers import AutoencoderKL

    from sdgraph.export import export_pipeline

    root = tmp_path_factory.mktemp("vae2")
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                  latent_channels=4, sample_size=32).save_pretrained(root / "vae")
    out = root / "model"
    export_pipeline(tiny_pipeline("sd15"), out, vae=root / "vae", submodels="text_encoder,unet,vae_decoder")
    return out


def test_vae_scale_factor_from_the_export(two_block_vae_export, tmp_path):
    d = two_block_vae_export
    assert json.loads((d / "sdgraph.json").read_text())["vae_scale_factor"] == 2
    pipe = open_pipeline(d)
    assert pipe.vae_scale == 2 and pipe.default_size() == (32, 32)
    res = _cli("run", d, "-p", "a cat", "--steps", 1, "--height", 32, "--width", 32, "-o", tmp_path / "a.png")
    assert res.exit_code == 0, res.output
    assert "32x32" in res.text and Image.open(tmp_path / "a.png").size == (32, 32)
    res = _cli("run", d, "-p", "a cat", "--steps", 1, "--height", 128, "--width", 128, "-o", tmp_path / "b.png")
    assert res.exit_code == 2 and "32x32" in res.text and not (tmp_path / "b.png").exists()
    # without the manifest's record: the VAE config's block_out_channels, as diffusers computes it
    from sdgraph.pipeline.runner import _vae_scale_factor

    assert _vae_scale_factor(d, {}) == 2
    (tmp_path / "bare" / "vae_decoder").mkdir(parents=True)
    (tmp_path / "bare" / "vae_decoder" / "model.onnx").symlink_to(d / "vae_decoder" / "model.onnx")
    assert _vae_scale_factor(tmp_path / "bare", {}) == 2  # from the decoder graph's 16 -> 32 shapes


# ----------------------------------------------------------------------------- item 8: Turbo
@pytest.fixture(scope="module")
def turbo(tiny_pipeline, tiny_taesd, tmp_path_factory):
    from sdgraph.export import export_pipeline

    out = tmp_path_factory.mktemp("turbo") / "model"
    export_pipeline(tiny_pipeline("turbo"), out, vae=tiny_taesd)
    return out


def test_turbo_demo_model_is_sdxl_with_the_turbo_scheduler(tiny_pipeline):
    src = tiny_pipeline("turbo")
    sched = json.loads((src / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "EulerAncestralDiscreteScheduler" and sched["timestep_spacing"] == "trailing"
    assert json.loads((src / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    assert json.loads((src / "sdgraph_demo.json").read_text())["sampling"] == {
        "steps": 1, "guidance": 0.0, "timestep_spacing": "trailing"}


def test_turbo_one_step_trailing_and_img2img_strength(turbo, tmp_path):
    pipe = open_pipeline(turbo)
    assert pipe.is_xl and json.loads((turbo / "sdgraph.json").read_text())["vae"]["class"] == "AutoencoderTiny"
    g = pipe.generate("cute cat", steps=1, guidance=0.0, seed=987)
    assert g.timesteps == [999.0] and g.stats["unet"]["calls"] == 1 and g.stats["text_encoder"]["calls"] == 1
    assert pipe.generate("cute cat", steps=1, guidance=0.0, timestep_spacing="leading").timesteps == [1.0]
    # the default euler scheduler with an explicit spacing: --scheduler euler --timestep-spacing trailing
    assert pipe.generate("cute cat", steps=1, guidance=0.0, scheduler="euler",
                         timestep_spacing="trailing").timesteps == [999.0]
    with pytest.raises(UsageError, match="timestep-spacing"):
        pipe.generate("cute cat", steps=1, timestep_spacing="middle")
    # img2img as the seed runs it: 2 steps x strength 0.5 = 1 denoising step, the trailing schedule's second
    i2i = pipe.generate("a cute cat with bow tie", steps=2, guidance=0.0, image=g.images[0], strength=0.5, seed=511)
    assert i2i.steps_run == 1 and i2i.timesteps == [499.0] and "vae_encoder" in i2i.stats
    # the CLI prints the first timestep
    res = _cli("run", turbo, "-p", "cute cat", "--steps", 1, "--guidance", 0, "-o", tmp_path / "cat.png")
    assert res.exit_code == 0 and "first timestep 999" in res.text, res.output
    res = _cli("run", turbo, "-p", "a cute cat with bow tie", "--image", tmp_path / "cat.png", "--steps", 2,
               "--strength", 0.5, "--guidance", 0, "-o", tmp_path / "tie.png")
    assert res.exit_code == 0 and "first timestep 499" in res.text, res.output


def test_bench_guidance_and_spacing_recorded(turbo, tmp_path):
    res = _cli("bench", turbo, "--steps", 1, "--repeats", 1, "--guidance", 0, "--timestep-spacing", "trailing",
               "--json-out", tmp_path / "b.json")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "b.json").read_text())
    r = rep["results"][0]
    assert rep["guidance"] == 0 and rep["timestep_spacing"] == "trailing" and r["timesteps"] == [999.0]
    assert r["unet_call_ms"] > 0 and r["submodel_ms"]["unet"] > 0


# ----------------------------------------------------------------------------- item 10: --image on bench/verify
@pytest.mark.slow  # exports the tiny InstructPix2Pix pipeline
def test_pix2pix_bench_and_verify_take_an_image(tiny_onnx, tmp_path):
    p2p = tiny_onnx("pix2pix")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    res = _cli("bench", p2p, "--steps", 1, "--repeats", 1)  # no image: the one-line error names --image
    assert res.exit_code == 2 and "--image" in res.output  # bad input: exit 2
    res = _cli("bench", p2p, "--steps", 1, "--repeats", 1, "--image", tmp_path / "in.png", "--image-guidance", 1.2,
               "--json-out", tmp_path / "b.json")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "b.json").read_text())
    assert rep["image"].endswith("in.png") and rep["failed"] == [] and rep["results"][0]["unet_its"] > 0
    res = _cli("verify", p2p, p2p, "--steps", 2, "--image", tmp_path / "in.png", "--prompt", "turn it into a cartoon",
               "-o", tmp_path / "v", "--max-pixel-diff", 0)
    assert res.exit_code == 0, res.output
    v = json.loads((tmp_path / "v" / "verify.json").read_text())
    assert v["summary"]["max_pixel_diff"] == 0 and len(v["images"]) == 1
    res = _cli("verify", p2p, p2p, "--steps", 1, "--image", tmp_path / "missing.png")
    assert res.exit_code == 2 and "missing.png" in res.output
