"""Seed 001 (OpenVINO + optimum-intel, SDXL-Turbo) replayed through the CLI on a tiny Turbo pipeline:
export with a TAESD VAE -> OpenVINO IR with fp16 weights -> 1-step txt2img at t=999 (trailing) ->
img2img at strength 0.5 -> INT8 UNet with the seed's ignored scope -> size/latency table fp16 vs int8."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdgraph.cli import app

pytest.importorskip("openvino", reason="seed 001 lowers to OpenVINO IR: needs the openvino package")
pytestmark = pytest.mark.slow

# The seed's IgnoredScope: conv_in, conv_out and one shortcut conv of the last up block.
SCOPE = "conv_in|conv_out|up_blocks.1/resnets.1/conv_shortcut"


def _cli(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return " ".join(res.output.split())  # the console wraps long lines


def test_seed_001_sdxl_turbo_openvino(tmp_path):
    # 1. the model: an SDXL-Turbo-architecture pipeline and a tiny autoencoder (TAESD), exported together
    _cli("demo-model", "--arch", "turbo", "-o", tmp_path / "sdxl-turbo")
    _cli("demo-model", "--arch", "taesd", "-o", tmp_path / "taesdxl")
    out = _cli("export", tmp_path / "sdxl-turbo", "--vae", tmp_path / "taesdxl", "-o", tmp_path / "model")
    assert "sdxl" in out
    man = json.loads((tmp_path / "model" / "sdgraph.json").read_text())
    assert man["vae"]["class"] == "AutoencoderTiny" and set(man["submodels"]) == {
        "text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder"}

    # 2. OpenVINO IR with fp16 weights (optimum-cli export openvino --fp16)
    _cli("lower", tmp_path / "model", "--target", "openvino", "--precision", "fp16", "-o", tmp_path / "ov-fp16")

    # 3. txt2img: 1 step, guidance 0, the Turbo scheduler's trailing spacing starts at t=999
    out = _cli("run", tmp_path / "ov-fp16", "-p", "cute cat", "--steps", 1, "--guidance", 0, "--seed", 987,
               "-o", tmp_path / "cat.png")
    assert "first timestep 999" in out and "on openvino" in out
    cat = np.asarray(Image.open(tmp_path / "cat.png"))
    assert cat.shape == (128, 128, 3) and cat.std() > 0
    out = _cli("run", tmp_path / "ov-fp16", "-p", "cute cat", "--steps", 1, "--guidance", 0, "--seed", 987,
               "--timestep-spacing", "leading", "-o", tmp_path / "cat-leading.png")
    assert "first timestep 1)" in out  # what SDXL's own leading spacing would do with 1 step

    # 4. img2img: 2 steps x strength 0.5 = 1 denoising step, from t=499
    out = _cli("run", tmp_path / "ov-fp16", "-p", "a cute cat with bow tie", "--image", tmp_path / "cat.png",
               "--steps", 2, "--strength", 0.5, "--guidance", 0, "--seed", 511, "-o", tmp_path / "cat_tie.png")
    assert "first timestep 499" in out
    tie = np.asarray(Image.open(tmp_path / "cat_tie.png"), dtype=np.int16)
    assert tie.shape == cat.shape and np.abs(tie - cat).max() > 0

    # 5. INT8 UNet: calibrated on Turbo's own 1-step trajectories, the seed's ignored scope kept in float
    out = _cli("optimize", tmp_path / "model", "--passes", f"qdq{{calib=4 steps=1 exclude={SCOPE}}}",
               "--submodels", "unet", "--report", tmp_path / "qdq.json", "-o", tmp_path / "model-int8")
    rep = json.loads((tmp_path / "qdq.json").read_text())
    stats = json.dumps(rep)
    assert '"excluded": 3' in stats
    # each submodel in its own precision: int8 UNet, fp16 weights elsewhere (as the seed's pipeline)
    _cli("lower", tmp_path / "model-int8", "--target", "openvino", "--precision", "fp16", "-o", tmp_path / "ov-int8")
    man = json.loads((tmp_path / "ov-int8" / "sdgraph.json").read_text())
    assert {k: v["precision"] for k, v in man["submodels"].items()} == {
        "text_encoder": "fp16", "text_encoder_2": "fp16", "unet": "int8", "vae_encoder": "fp16", "vae_decoder": "fp16"}
    out = _cli("run", tmp_path / "ov-int8", "-p", "cute cat", "--steps", 1, "--guidance", 0, "--seed", 987,
               "-o", tmp_path / "cat-int8.png")
    assert "first timestep 999" in out
    int8_cat = np.asarray(Image.open(tmp_path / "cat-int8.png"), dtype=np.int16)
    assert int8_cat.shape == cat.shape

    # 6. the size/latency table: UNet file size and pipeline latency, fp16 vs int8
    out = _cli("bench", tmp_path / "ov-fp16", tmp_path / "ov-int8", "--steps", 1, "--guidance", 0,
               "--timestep-spacing", "trailing", "--repeats", 2, "--json-out", tmp_path / "bench.json")
    b = json.loads((tmp_path / "bench.json").read_text())
    fp16, int8 = b["results"]
    assert fp16["timesteps"] == int8["timesteps"] == [999.0]
    assert int8["submodel_mb"]["unet"] < 0.75 * fp16["submodel_mb"]["unet"]  # int8 weights: about half of fp16
    assert int8["submodel_mb"]["text_encoder"] == pytest.approx(fp16["submodel_mb"]["text_encoder"], rel=0.01)
    assert fp16["e2e_s"] > 0 and int8["e2e_s"] > 0 and int8["ratios"]["e2e_speedup"] > 0
