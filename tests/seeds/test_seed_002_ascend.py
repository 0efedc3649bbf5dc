"""Seed 002 (Ascend ModelZoo, Atlas 300I Duo) end to end through the CLI on tiny random-weight SD1.5 models.

export (CFG batch 2) -> `optimize unet.onnx --passes tome:5,fa` (the card's modify_onnx.py --FA_soc Duo
--TOME_num 5) -> `lower --target ascend310p` in the model folder with a recording fake `atc` on PATH
-> the batch-1 UNet for two-device CFG valid in ONNX Runtime, convert.sh right -> the prompt file run
(on ONNX Runtime, two UNet instances: an .om needs an NPU, which `run` says in one line).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys

import numpy as np
import pytest

import sdgraph as sdgraph_api
from sdgraph.ir import runtime
from sdgraph.manifest import read_manifest
from tests.test_cli import _assert_one_line_error, sdgraph

pytestmark = pytest.mark.slow


def _fake_atc(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "atc_calls.jsonl"
    (bindir / "atc").write_text(f"""#!{sys.executable}
import json, os, sys
args = sys.argv[1:]
with open({str(log)!r}, "a") as f:
    f.write(json.dumps({{"cwd": os.getcwd(), "args": args}}) + "\\n")
out = [a.split("=", 1)[1] for a in args if a.startswith("--output=")][0]
open(out + ".om", "wb").write(b"OM")
""")
    (bindir / "atc").chmod(0o755 | stat.S_IEXEC)
    return bindir, log


def test_seed_002_ascend_workflow(tiny_sd15_pipeline, tiny_sd15_onnx, tmp_path):
    env_path = os.environ["PATH"]
    # 1. export at the CFG batch (the card: stable_diffusion_2_onnx.py --batch_size; CFG doubles it)
    models = tmp_path / "models_bs1"
    res = sdgraph("export", tiny_sd15_pipeline, "-o", models, "--batch", "2")
    assert res.returncode == 0, res.stderr
    # 2. the card's graph surgery, as written, in the UNet's folder: FA + 5 ToMe blocks (tiny: 4 exist)
    work = tmp_path / "surgery"
    work.mkdir()
    for f in (models / "unet").iterdir():  # the graph as unet.onnx, its weights file as it is named
        shutil.copy(f, work / ("unet.onnx" if f.name == "model.onnx" else f.name))
    res = sdgraph("optimize", "unet.onnx", "--passes", "tome:5,fa", cwd=work)
    assert res.returncode == 0 and "wrote unet.opt.onnx" in res.stdout, res.stderr
    assert "4/4" in res.stdout  # tome matched every transformer block
    shutil.rmtree(models / "unet")  # the card's --new_model: the surgery's output is the UNet lowered next
    sdgraph_api.load(work / "unet.opt.onnx").save(models / "unet")
    # 3. atc per submodel, run from the model folder with no source and no -o, a recording atc on PATH
    bindir, log = _fake_atc(tmp_path)
    os.environ["PATH"] = f"{bindir}{os.pathsep}{env_path}"
    try:
        res = sdgraph("lower", "--target", "ascend310p", "--precision", "fp16", cwd=models)
    finally:
        os.environ["PATH"] = env_path
    assert res.returncode == 0, res.stderr
    out = tmp_path / "models_bs1-ascend310p"
    man = read_manifest(out)
    calls = [json.loads(line)["args"] for line in log.read_text().splitlines()]
    by_model = {(c[1], next(a for a in c if a.startswith("--input_shape="))) for c in calls}
    assert len(calls) == 5  # text encoder, unet, unet batch 1, vae encoder, vae decoder
    assert ("--model=model_bs1.onnx", "--input_shape=sample:1,4,16,16;timestep:1;encoder_hidden_states:1,77,32") in by_model
    assert ("--model=model.onnx", "--input_shape=sample:2,4,16,16;timestep:2;encoder_hidden_states:2,77,32") in by_model
    assert all("--soc_version=Ascend310P3" in c and "--precision_mode=force_fp16" in c for c in calls)
    unet_calls = [c for c in calls if "--op_select_implmode=high_performance" in c]
    assert len(unet_calls) == 2 and all("--optypelist_for_implmode=Gelu,Sigmoid" in c for c in unet_calls)
    script = (out / "unet" / "convert.sh").read_text().splitlines()
    assert script[-1].startswith("atc --framework=5 --model=model_bs1.onnx --output=model_bs1 --input_format=NCHW "
                                 "'--input_shape=sample:1,4,16,16;timestep:1;encoder_hidden_states:1,77,32'")
    legal = man["submodels"]["unet"]["legalize"]
    assert legal["tome_plugin"] == 4 and legal["parallel_cfg"] == "unet_bs1"
    assert legal["parallel_cfg_check"]["check"].startswith("onnxruntime: batch-1 outputs = first half of batch 2")
    assert (out / "unet" / "model_bs1.om").is_file() and man["submodels"]["unet"]["converted"]
    # 4. the batch-1 model itself in ONNX Runtime (plugin ops off so ORT has every kernel): half of batch 2
    res = sdgraph("lower", models, "--target", "ascend310p", "-o", tmp_path / "std", "--option", "fa=false",
                  "--option", "tome=false", "--option", "run_atc=false", "--submodels", "unet")
    assert res.returncode == 0, res.stderr
    bs2, bs1 = tmp_path / "std" / "unet" / "model.onnx", tmp_path / "std" / "unet" / "model_bs1.onnx"
    feeds = runtime.seeded_inputs(bs2, 5)
    want = runtime.run(bs2, feeds)["out_sample"]
    got = runtime.run(bs1, {k: v[:1] for k, v in feeds.items()})["out_sample"]
    assert got.shape == (1, 4, 16, 16) and np.abs(got - want[:1]).max() <= 1e-5 * np.abs(want).max()
    # 5. inference from a prompt file, parallel CFG: the .om needs an NPU (one line, exit 3); the same
    #    optimized graphs run on ONNX Runtime with the guidance batch split over two UNet instances
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red bicycle\nislands in a serene landscape\n")
    _assert_one_line_error(sdgraph("run", out, "--prompt-file", prompts, "--steps", "2", "-o", tmp_path / "om_imgs"), 3,
                           "Ascend NPU")
    opt = tmp_path / "sd15-opt"
    assert sdgraph("optimize", tiny_sd15_onnx, "--passes", "tome:5,fa", "-o", opt, "--submodels", "unet").returncode == 0
    res = sdgraph("run", opt, "--prompt-file", prompts, "--steps", "2", "--devices", "2", "-o", tmp_path / "imgs")
    assert res.returncode == 0, res.stderr
    assert len(list((tmp_path / "imgs").glob("*.png"))) == 2
