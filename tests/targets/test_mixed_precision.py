"""A model dir with an INT8 (QDQ) UNet beside fp32 text encoder and VAE lowers with each submodel at its own
precision (the OpenVINO SDXL-Turbo seed's layout), asked for ``--precision int8`` or for nothing."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from sdgraph.cli import app
from sdgraph.ir.model import Model
from sdgraph.targets.driver import graph_precision, submodel_precision


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def int8_unet_dir(tiny_sd15_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed") / "model-int8-unet"
    res = _cli("optimize", tiny_sd15_onnx, "--passes", "qdq{calib=2 steps=1 held_out=0}", "--submodels", "unet",
               "-o", out)
    assert res.exit_code == 0, res.output
    return out


def test_submodel_precision_rules():
    takes = ("fp32", "bf16", "fp16", "int8")
    assert submodel_precision("int8", "int8", takes, True) == "int8"
    assert submodel_precision("int8", "fp32", takes, True) == "fp32"  # the text encoder beside an int8 UNet
    assert submodel_precision(None, "fp16", takes, True) == "fp16"
    assert submodel_precision("fp16", "fp32", takes, True) == "fp16"  # asked for: applies to the float ones
    assert submodel_precision("fp16", "int8", takes, True) == "int8"  # a QDQ graph stays int8
    assert submodel_precision(None, "fp16", ("fp32", "int8"), True) == "fp32"  # the target does not take fp16
    assert submodel_precision("int8", "fp32", takes, False) == "int8"  # nothing quantized: the target refuses


@pytest.mark.slow  # quantizes a UNet, then lowers every submodel (OpenVINO compiles)
@pytest.mark.parametrize("target", ["openvino", "ort"])
@pytest.mark.parametrize("precision", ["int8", None])
def test_int8_unet_dir_lowers_each_submodel_in_its_own_precision(int8_unet_dir, tmp_path, target, precision):
    if target == "openvino":
        pytest.importorskip("openvino", reason="the openvino target needs the openvino package")
    out = tmp_path / f"{target}-{precision}"
    args = ["lower", int8_unet_dir, "--target", target, "-o", out] + (["--precision", precision] if precision else [])
    res = _cli(*args)
    assert res.exit_code == 0, res.output
    man = json.loads((out / "sdgraph.json").read_text())
    precs = {k: v["precision"] for k, v in man["submodels"].items()}
    assert precs == {"text_encoder": "fp32", "unet": "int8", "vae_encoder": "fp32", "vae_decoder": "fp32"}
    assert man["precision"] == "mixed" and man["submodels"]["unet"]["graph_precision"] == "int8"
    res = _cli("run", out, "-p", "a cat", "--steps", 1, "-o", tmp_path / "img.png")
    assert res.exit_code == 0 and f"on {target}" in res.output, res.output


def test_int8_of_a_dir_without_quantized_graphs_is_refused(tiny_sd15_onnx, tmp_path):
    res = _cli("lower", tiny_sd15_onnx, "--target", "ort", "--precision", "int8", "--submodels", "unet",
               "-o", tmp_path / "x")
    assert res.exit_code == 4 and "QDQ" in res.output and not (tmp_path / "x").exists()


@pytest.mark.parametrize("elem, name", [(onnx.TensorProto.BFLOAT16, "bf16"), (onnx.TensorProto.FLOAT16, "fp16"),
                                        (onnx.TensorProto.FLOAT, "fp32")])
def test_graph_precision_of_a_graph_read_back_from_disk(tmp_path, elem, name):
    """bfloat16 weights come back from disk as the ONNX enum (numpy has no bfloat16): still ``bf16``."""
    w = onnx.helper.make_tensor("w", elem, [4, 4], np.ones(16, np.float32).tolist() if elem != onnx.TensorProto.BFLOAT16
                                else [0x3F80] * 16)
    graph = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", elem, [1, 4])],
                                   [onnx.helper.make_tensor_value_info("y", elem, [1, 4])], [w])
    path = tmp_path / "m.onnx"
    onnx.save(onnx.helper.make_model(graph), path)
    assert graph_precision(Model.load(path)) == name
