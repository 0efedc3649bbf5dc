"""The card's commands as written: default outputs beside the input, `lower` in the model's folder, per-submodel shapes."""

from __future__ import annotations

import shutil

import pytest

from sdgraph.errors import UsageError
from sdgraph.ir import runtime
from sdgraph.manifest import read_manifest
from sdgraph.shape_spec import check_shape_names, derive_shapes, parse_shape_args, shapes_for
from tests.test_cli import _assert_one_line_error, _digest, sdgraph


def _unet_folder(tiny_sd15_onnx, tmp_path):
    """A folder holding just unet.onnx and its weights, as the Ascend card starts."""
    d = tmp_path / "work"
    d.mkdir()
    for f in (tiny_sd15_onnx / "unet").iterdir():  # the graph as unet.onnx, its weights file as it is named
        shutil.copy(f, d / ("unet.onnx" if f.name == "model.onnx" else f.name))
    return d


@pytest.mark.slow  # CLI runs that optimize and lower the exported pipeline
def test_card_commands_from_a_folder_with_unet_onnx(tiny_sd15_onnx, tmp_path):
    d = _unet_folder(tiny_sd15_onnx, tmp_path)
    before = _digest(d)
    res = sdgraph("optimize", "unet.onnx", "--passes", "tome:5,fa", cwd=d)
    assert res.returncode == 0, res.stderr
    assert "wrote unet.opt.onnx" in res.stdout
    assert {k: v for k, v in _digest(d).items() if k in before} == before  # the input is untouched
    ops = runtime.session(d / "unet.opt.onnx").get_inputs()  # loads in ORT
    assert [i.name for i in ops] == ["sample", "timestep", "encoder_hidden_states"]
    again = sdgraph("optimize", "unet.onnx", "--passes", "tome:5,fa", cwd=d)
    _assert_one_line_error(again, 2, "unet.opt.onnx exists: the default output would replace it; pass -o PATH")
    res = sdgraph("lower", "--target", "ascend310p", "--option", "run_atc=false", cwd=d)
    assert res.returncode == 0, res.stderr
    out = d / "unet.opt-ascend310p"
    assert "wrote unet.opt-ascend310p in" in res.stdout
    man = read_manifest(out)
    assert man["source"]["path"] == str((d / "unet.opt.onnx").resolve()) and list(man["submodels"]) == ["unet"]
    assert man["submodels"]["unet"]["legalize"]["tome_plugin"] == 4  # the ToMe blocks reached the plugin ops
    assert (out / "unet" / "convert.sh").read_text().count("atc --framework=5") == 1  # batch 1: no CFG variant
    _assert_one_line_error(sdgraph("lower", "--target", "ascend310p", cwd=d), 2, "exists: the default output")


@pytest.mark.slow  # CLI runs that optimize and lower the exported pipeline
def test_card_commands_from_a_model_folder(tiny_sd15_onnx, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(tiny_sd15_onnx, models)
    res = sdgraph("optimize", "models", "--passes", "tome:5,fa", cwd=tmp_path)
    assert res.returncode == 0 and "wrote models-opt" in res.stdout, res.stderr
    res = sdgraph("lower", "--target", "ascend310p", "--option", "run_atc=false", cwd=tmp_path / "models-opt")
    assert res.returncode == 0, res.stderr
    out = tmp_path / "models-opt-ascend310p"
    assert sorted(read_manifest(out)["submodels"]) == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_one_line_error(sdgraph("lower", "--target", "ascend310p", cwd=empty), 2, "no model here")


# -- per-submodel shapes ------------------------------------------------------------------------
SIGS = {"unet": {"sample": ["batch", 4, "h", "w"], "timestep": ["batch"], "encoder_hidden_states": ["batch", 77, 32]},
        "vae_encoder": {"sample": ["batch", 3, "ih", "iw"]}, "vae_decoder": {"latent_sample": ["batch", 4, "h", "w"]},
        "text_encoder": {"input_ids": ["batch", 77]}}


def test_shape_parser_per_submodel_and_old_forms():
    (b,) = parse_shape_args(["unet:sample=2x4x64x64", "sample=1,3,512,512;input_ids=1x77"])
    assert b == {"unet:sample": (2, 4, 64, 64), "sample": (1, 3, 512, 512), "input_ids": (1, 77)}
    assert shapes_for(b, "unet", SIGS["unet"]) == {"sample": (2, 4, 64, 64)}  # qualified wins over the bare name
    assert shapes_for(b, "vae_encoder", SIGS["vae_encoder"]) == {"sample": (1, 3, 512, 512)}
    (bare,) = parse_shape_args(["sample=2x4x64x64"])  # the README's form: fits the UNet, not the 3-channel encoder
    assert shapes_for(bare, "unet", SIGS["unet"]) == {"sample": (2, 4, 64, 64)} and shapes_for(bare, "vae_encoder", SIGS["vae_encoder"]) == {}
    check_shape_names([b, bare], SIGS)
    for bad, msg in (({"vae:sample": (1,)}, "unknown input 'vae:sample'"),
                     ({"unet:latent": (1,)}, "unet has no input 'latent'"),
                     ({"text_encoder_2:input_ids": (1, 77)}, "no submodel 'text_encoder_2' here"),
                     ({"sample": (2, 5, 8, 8)}, "dim 1 fixed to 4 (qualify it: --shape unet:sample=...)")):
        with pytest.raises(UsageError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            check_shape_names([bad], SIGS)


def test_shapes_derived_from_one_size():
    d = derive_shapes(SIGS, 512, 768, 1)
    assert d == {"unet:sample": (2, 4, 64, 96), "unet:timestep": (2,), "unet:encoder_hidden_states": (2, 77, 32),
                 "vae_encoder:sample": (1, 3, 512, 768), "vae_decoder:latent_sample": (1, 4, 64, 96),
                 "text_encoder:input_ids": (1, 77)}
    with pytest.raises(UsageError, match="multiples of 8"):
        derive_shapes(SIGS, 500, 512, 1)


@pytest.mark.slow  # CLI runs that optimize and lower the exported pipeline
def test_lower_model_dir_with_readme_shapes_and_with_height_width(tiny_onnx, tmp_path):
    dyn = tiny_onnx("sd15", "legacy", dynamic=True)
    res = sdgraph("lower", dyn, "--target", "ascend310p", "-o", tmp_path / "a", "--option", "run_atc=false",
                  "--shape", "sample=2x4x32x32", "--shape", "encoder_hidden_states=2x77x32", "--shape", "input_ids=1x77",
                  "--shape", "latent_sample=1x4x32x32")
    assert res.returncode == 0, res.stderr
    shapes = {s: e["shapes"] for s, e in read_manifest(tmp_path / "a")["submodels"].items()}
    assert shapes["unet"] == [{"sample": [2, 4, 32, 32], "encoder_hidden_states": [2, 77, 32], "timestep": [2]}]
    assert shapes["vae_encoder"] == [{"sample": [1, 3, 256, 256]}]  # derived from the UNet's latent, not its 4 channels
    res = sdgraph("lower", dyn, "--target", "ascend310p", "-o", tmp_path / "b", "--option", "run_atc=false",
                  "--height", "128", "--width", "192", "--shape", "vae_decoder:latent_sample=1x4x8x8")
    assert res.returncode == 0, res.stderr
    shapes = {s: e["shapes"] for s, e in read_manifest(tmp_path / "b")["submodels"].items()}
    assert shapes["unet"][0]["sample"] == [2, 4, 16, 24] and shapes["vae_decoder"] == [{"latent_sample": [1, 4, 8, 8]}]
    assert shapes["text_encoder"] == [{"input_ids": [1, 77]}] and shapes["vae_encoder"] == [{"sample": [1, 3, 128, 192]}]
    _assert_one_line_error(sdgraph("lower", dyn, "--target", "ort", "-o", tmp_path / "c", "--shape", "unet:latent=1x4"),
                           2, "--shape unet:latent: unet has no input 'latent'")
