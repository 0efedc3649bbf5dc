"""ControlNet through the compiler: export, passes, run on every target, against diffusers' pipeline.

Tiny random-weight ControlNet pipelines (``sdgraph.demo``, zero convolutions randomized so the
residuals are not all 0), 128 px images, 2 denoising steps.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from sdgraph.export import residual_shapes
from sdgraph.manifest import read_manifest
from sdgraph.pipeline.runner import open_pipeline
from tests.test_cli import _assert_one_line_error, sdgraph

pytestmark = pytest.mark.slow  # exports a ControlNet pipeline (its own export, ~1 min of CPU)

STEPS = 2
PROMPT = "a red bicycle"


@pytest.fixture(scope="module")
def cn_pipeline(tmp_path_factory):
    from sdgraph.demo import build_demo_pipeline

    return build_demo_pipeline(tmp_path_factory.mktemp("cn") / "sd15-cn", "sd15", "tiny", seed=0, controlnet=True)


@pytest.fixture(scope="module")
def cn_onnx(cn_pipeline, tmp_path_factory):
    from sdgraph.export import export_pipeline

    out = tmp_path_factory.mktemp("cn-onnx") / "sd15-cn"
    export_pipeline(cn_pipeline, out)
    return out


@pytest.fixture(scope="module")
def control(tmp_path_factory):
    """A 96x96 control image: every run resizes it to 128x128, as diffusers does."""
    path = tmp_path_factory.mktemp("ctrl") / "edges.png"
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(path)
    return path


def _px(img) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def test_export_writes_controlnet_and_a_unet_with_residual_inputs(cn_pipeline, cn_onnx):
    man = read_manifest(cn_onnx)
    assert list(man["submodels"]) == ["text_encoder", "controlnet", "unet", "vae_encoder", "vae_decoder"]
    unet_cfg = json.loads((cn_pipeline / "unet" / "config.json").read_text())
    shapes = residual_shapes(unet_cfg, 16, 16)
    assert shapes == [(32, 16, 16), (32, 16, 16), (32, 8, 8), (64, 8, 8), (64, 8, 8)]  # conv_in, res, down, res | mid
    cn = man["submodels"]["controlnet"]
    assert [i["name"] for i in cn["inputs"]] == ["sample", "timestep", "encoder_hidden_states", "controlnet_cond",
                                                 "conditioning_scale"]
    ins = {i["name"]: i["shape"] for i in cn["inputs"]}
    assert ins["controlnet_cond"] == [1, 3, 128, 128] and ins["conditioning_scale"] == [1]
    outs = [o["name"] for o in cn["outputs"]]
    assert outs == [f"down_block_res_samples.{i}" for i in range(4)] + ["mid_block_res_sample"]
    assert [o["shape"] for o in cn["outputs"]] == [[1, *s] for s in shapes]
    unet_ins = {i["name"]: i["shape"] for i in man["submodels"]["unet"]["inputs"]}
    assert [unet_ins[f"down_block_additional_residuals.{i}"] for i in range(4)] + \
        [unet_ins["mid_block_additional_residual"]] == [[1, *s] for s in shapes]
    assert cn["parity"]["worst"]["max_rel"] <= 1e-3 and cn["class"] == "ControlNetModel"
    assert man["controlnet"]["down_residuals"] == 4
    from sdgraph.ir.model import Model

    assert Model.load(cn_onnx / "controlnet" / "model.onnx").role == "controlnet"


def test_images_equal_diffusers_controlnet_pipeline(cn_pipeline, cn_onnx, control):
    import torch
    from diffusers import StableDiffusionControlNetPipeline

    ctrl = Image.open(control).convert("RGB")
    pipe = StableDiffusionControlNetPipeline.from_pretrained(cn_pipeline)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPT, image=ctrl, height=128, width=128, num_inference_steps=STEPS, guidance_scale=7.5, controlnet_conditioning_scale=0.7,
               generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    ours = open_pipeline(cn_onnx)
    g = ours.generate(PROMPT, steps=STEPS, seed=0, control_image=ctrl, control_scale=0.7)
    assert np.abs(np.round(ref * 255).astype(np.int16) - _px(g.images[0])).max() <= 1
    assert g.stats["controlnet"]["calls"] == 2 * g.steps_run  # batch-1 export: the CFG halves in two calls per step
    assert "control image is 96x96, resized to 128x128" in g.notes
    # the conditioning is not a no-op: without a control image (zero residuals) the image changes
    plain = ours.generate(PROMPT, steps=STEPS, seed=0)
    assert "controlnet" not in plain.stats and np.abs(_px(plain.images[0]) - _px(g.images[0])).max() > 10


@pytest.mark.slow  # nine CLI subprocesses (torch import each): ~20-40 s
def test_cli_run_and_bad_inputs(cn_onnx, tiny_sd15_onnx, control, tmp_path):
    res = sdgraph("run", cn_onnx, "-p", PROMPT, "--steps", "1", "--controlnet", "--control-image", control,
                  "--control-scale", "0.5", "-o", tmp_path / "a.png")
    assert res.returncode == 0, res.stderr
    assert "note: control edges.png: image is 96x96, resized to 128x128" in res.stderr
    assert Image.open(tmp_path / "a.png").size == (128, 128)
    base = ["run", cn_onnx, "-p", PROMPT, "--steps", "1", "-o", tmp_path / "b.png"]
    _assert_one_line_error(sdgraph(*base, "--controlnet"), 2, "--controlnet needs --control-image")
    _assert_one_line_error(sdgraph(*base, "--control-image", control), 2, "--control-image goes with --controlnet")
    _assert_one_line_error(sdgraph(*base, "--controlnet", "--control-image", tmp_path / "nope.png"), 2,
                           "no such image file")
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    _assert_one_line_error(sdgraph(*base, "--controlnet", "--control-image", bad), 2, "not a readable image")
    _assert_one_line_error(sdgraph(*base, "--controlnet", "--control-image", control, "--control-scale", "nan"), 2,
                           "--control-scale")
    _assert_one_line_error(sdgraph("run", tiny_sd15_onnx, "-p", PROMPT, "--steps", "1", "--controlnet",
                                   "--control-image", control, "-o", tmp_path / "c.png"), 2, "no controlnet submodel")
    assert not (tmp_path / "b.png").exists() and not (tmp_path / "c.png").exists()
    _assert_one_line_error(sdgraph("export", tmp_path, "-o", tmp_path / "x", "--controlnet", tmp_path / "none"), 2, "")


def test_export_controlnet_dir_option(tiny_sd15_pipeline, tmp_path):
    """``--controlnet DIR`` on a plain pipeline; a folder that is not a ControlNet is refused in one line."""
    from sdgraph.demo import build_demo_controlnet
    from sdgraph.errors import InputError
    from sdgraph.export import export_pipeline

    cn = build_demo_controlnet(tmp_path / "cn", "sd15", "tiny", seed=0)
    with pytest.raises(InputError, match="not a ControlNet"):
        export_pipeline(tiny_sd15_pipeline, tmp_path / "o1", controlnet=tiny_sd15_pipeline / "unet")
    man = export_pipeline(tiny_sd15_pipeline, tmp_path / "o2", controlnet=cn, submodels="controlnet,unet")
    assert list(man["submodels"]) == ["controlnet", "unet"] and man["controlnet"]["source"] == str(cn.resolve())
    index = json.loads((tmp_path / "o2" / "model_index.json").read_text())
    assert index["controlnet"] == ["diffusers", "ControlNetModel"]


def test_shapes_derived_for_controlnet_and_residuals():
    from sdgraph.shape_spec import derive_shapes

    subs = {"controlnet": {"sample": ["batch", 4, "height", "width"], "controlnet_cond": ["batch", 3, "ih", "iw"],
                           "conditioning_scale": [1]},
            "unet": {"sample": ["batch", 4, "height", "width"],
                     "down_block_additional_residuals.3": ["batch", 64, "height_div2", "width_div2"],
                     "mid_block_additional_residual": ["batch", 1280, "height_div8", "width_div8"]}}
    got = derive_shapes(subs, 136, 128, batch=1)
    assert got["controlnet:sample"] == (2, 4, 17, 16) and got["controlnet:controlnet_cond"] == (2, 3, 136, 128)
    assert got["unet:down_block_additional_residuals.3"] == (2, 64, 9, 8)  # ceil(17 / 2): stride-2 conv
    assert got["unet:mid_block_additional_residual"] == (2, 1280, 3, 2)
    assert "controlnet:conditioning_scale" not in got


@pytest.mark.slow  # lowers the ControlNet pipeline to OpenVINO and torch and runs both (~60 s)
def test_every_target_runs_controlnet(cn_onnx, control, tmp_path):
    from sdgraph.passes.manager import optimize_path
    from sdgraph.targets import lower

    ctrl = Image.open(control).convert("RGB")
    ref = open_pipeline(cn_onnx).generate(PROMPT, steps=STEPS, seed=0, control_image=ctrl)
    # the UNet's passes apply to the ControlNet graph: attention, GroupNorm and GEGLU fused
    opt = tmp_path / "opt"
    optimize_path(cn_onnx, "sd-unet", opt, submodels=["controlnet", "unet"])
    recs = {r["pass"]: r for r in read_manifest(opt)["passes"][-1]["submodels"]["controlnet"]["records"]}
    assert recs["fa"]["modified"] and recs["gn"]["modified"] and recs["geglu"]["modified"]
    for target in ("ort", "openvino", "torch"):
        art = lower(opt, target, tmp_path / target, options={"mode": "eager"} if target == "torch" else None).out
        g = open_pipeline(art).generate(PROMPT, steps=STEPS, seed=0, control_image=ctrl)
        assert g.stats["controlnet"]["calls"] == 2 * g.steps_run, target
        assert np.abs(_px(g.images[0]) - _px(ref.images[0])).max() <= 2, target


@pytest.mark.slow  # an SDXL ControlNet export (~30 s)
def test_sdxl_controlnet_export_structure(tmp_path):
    from sdgraph.demo import build_demo_pipeline
    from sdgraph.export import export_pipeline

    src = build_demo_pipeline(tmp_path / "sdxl-cn", "sdxl", "tiny", seed=0, controlnet=True)
    man = export_pipeline(src, tmp_path / "onnx", submodels="controlnet,unet")
    cn = [i["name"] for i in man["submodels"]["controlnet"]["inputs"]]
    assert cn == ["sample", "timestep", "encoder_hidden_states", "controlnet_cond", "conditioning_scale",
                  "text_embeds", "time_ids"]
    unet = [i["name"] for i in man["submodels"]["unet"]["inputs"]]
    n = man["controlnet"]["down_residuals"]
    assert n == 4 and unet == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"] + \
        [f"down_block_additional_residuals.{i}" for i in range(n)] + ["mid_block_additional_residual"]
    assert man["family"] == "sdxl" and man["submodels"]["controlnet"]["parity"]["worst"]["max_rel"] <= 1e-3


@pytest.mark.slow  # lowering every submodel with a recording fake atc
def test_ascend_lowers_controlnet_with_the_unet_treatment(cn_onnx, tmp_path):
    from tests.seeds.test_seed_002_ascend import _fake_atc

    bindir, log = _fake_atc(tmp_path)
    env = os.environ["PATH"]
    os.environ["PATH"] = f"{bindir}{os.pathsep}{env}"
    try:
        res = sdgraph("lower", cn_onnx, "--target", "ascend310p", "-o", tmp_path / "om", "--submodels", "controlnet")
    finally:
        os.environ["PATH"] = env
    assert res.returncode == 0, res.stderr
    calls = [json.loads(line)["args"] for line in log.read_text().splitlines()]
    assert len(calls) == 1
    shape = next(a for a in calls[0] if a.startswith("--input_shape="))
    assert "controlnet_cond:1,3,128,128" in shape and "conditioning_scale:1" in shape
    assert "--op_select_implmode=high_performance" in calls[0]
    legal = read_manifest(tmp_path / "om")["submodels"]["controlnet"]["legalize"]
    assert legal["timestep_int32"] == "timestep"
