"""Export: tiny pipelines of every family, both exporters, parity with torch, OpenVINO cross-check, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from sdgraph.errors import InputError, UsageError, VerificationError
from sdgraph.export import export_pipeline

TOL = 1e-4  # the bar: every submodel within max_rel 1e-4 of torch

# Submodels per arch; the dynamo run skips those whose architecture another arch already covers
# with that exporter (the slow test_dynamo_export_whole_pipelines runs the whole matrix).
ALL = {
    "sd15": ["text_encoder", "unet", "vae_encoder", "vae_decoder"],
    "sd21": ["text_encoder", "unet", "vae_encoder", "vae_decoder"],
    "sdxl": ["text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder"],
    "pix2pix": ["text_encoder", "unet", "vae_encoder", "vae_decoder"],
}
DYNAMO_DISTINCT = {"sd15": None, "sd21": "text_encoder,unet", "sdxl": "text_encoder_2,unet", "pix2pix": "unet"}
FAMILY = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl", "pix2pix": "pix2pix"}


def sdgraph(*args):
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "sdgraph", *map(str, args)], capture_output=True, text=True, env=env)


def _one_line_error(res, code: int, match: str) -> None:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], res.stderr


def _nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def _check_dir(out: Path, arch: str, exporter: str, names: list[str]) -> dict:
    man = json.loads((out / "sdgraph.json").read_text())
    assert man["family"] == FAMILY[arch] and man["exporter"] == exporter
    assert list(man["submodels"]) == names
    for name, sub in man["submodels"].items():
        files = sorted(p.name for p in (out / name).iterdir())
        assert files == ["config.json", "model.onnx", "model.onnx_data"], files
        proto = onnx.load(str(out / name / "model.onnx"), load_external_data=False)
        assert proto.ir_version <= 10
        assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {man["opset"]}
        # every external tensor lives in the one data file beside the graph
        locs = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
        assert locs == {"model.onnx_data"}
        worst = sub["parity"]["worst"]
        assert worst["max_rel"] <= TOL and worst["cosine"] > 0.99999, (name, worst)
        assert sub["files"]["model.onnx"]["sha256"].startswith("sha256:")
    assert (out / "model_index.json").is_file() and (out / "scheduler" / "scheduler_config.json").is_file()
    assert (out / "tokenizer" / "vocab.json").is_file()
    return man


# --------------------------------------------------------------------------- demo models
def test_generated_clip_tokenizer_is_a_working_bpe():
    from sdgraph.demo import clip_bpe, make_clip_tokenizer

    vocab, merges = clip_bpe(2048)
    assert len(vocab) == 2048 and len(set(vocab.values())) == 2048
    assert vocab["<|endoftext|>"] == 2047 and vocab["<|startoftext|>"] == 2046  # eos has the largest id, as in CLIP
    assert clip_bpe(600)[0]["<|endoftext|>"] == 599  # any size from 514 up
    tok = make_clip_tokenizer(2048)
    ids = tok("A photo of an astronaut riding a horse", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == 2046 and ids[-1] == 2047 and max(ids) < 2048
    toks = tok.convert_ids_to_tokens(ids[1:8])
    assert "astronaut</w>" in toks and "photo</w>" in toks  # learned merges make whole words
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of an astronaut riding a horse"
    # any text (unicode included) still tokenizes: every byte is in the vocabulary
    assert max(tok("ünïcødé ✓ 123").input_ids) < 2048


@pytest.mark.slow  # builds all four tiny pipelines
def test_demo_pipelines_have_each_family_features(tiny_pipeline):
    cfg = {a: json.loads((tiny_pipeline(a) / "unet" / "config.json").read_text()) for a in ALL}
    assert cfg["sd15"]["down_block_types"][0] == "CrossAttnDownBlock2D"  # attention at the top level
    assert cfg["sd21"]["use_linear_projection"] and cfg["sd21"]["upcast_attention"]
    assert list(cfg["sd21"]["attention_head_dim"]) == [2, 4]
    sched = json.loads((tiny_pipeline("sd21") / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"
    assert cfg["sdxl"]["addition_embed_type"] == "text_time" and list(cfg["sdxl"]["transformer_layers_per_block"]) == [1, 2]
    te2 = json.loads((tiny_pipeline("sdxl") / "text_encoder_2" / "config.json").read_text())
    assert te2["architectures"] == ["CLIPTextModelWithProjection"]
    assert cfg["pix2pix"]["in_channels"] == 8
    index = json.loads((tiny_pipeline("pix2pix") / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInstructPix2PixPipeline"


def test_demo_pipeline_runs_in_diffusers(tiny_sd15_pipeline):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_pipeline)
    img = pipe("a red bicycle", num_inference_steps=2, output_type="np").images
    assert img.shape == (1, 128, 128, 3) and np.isfinite(img).all()


def test_full_size_sd15_unet_has_860m_parameters():
    import torch
    from diffusers import UNet2DConditionModel

    from sdgraph.demo import _UNET

    with torch.device("meta"):
        unet = UNet2DConditionModel(**_UNET[("sd15", "full")])
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6) == 860


# --------------------------------------------------------------------------- export matrix
# sd15 is the session fixture every fast test shares; each other arch is its own ~10 s export.
@pytest.mark.parametrize("arch", [a if a == "sd15" else pytest.param(a, marks=pytest.mark.slow) for a in ALL])
def test_legacy_export_matches_torch(tiny_onnx, arch):
    out = tiny_onnx(arch, "legacy")
    man = _check_dir(out, arch, "legacy", ALL[arch])
    unet = {i["name"]: i for i in man["submodels"]["unet"]["inputs"]}
    expected = ["sample", "timestep", "encoder_hidden_states"] + (["text_embeds", "time_ids"] if arch == "sdxl" else [])
    assert list(unet) == expected
    assert unet["sample"]["shape"] == [1, 8 if arch == "pix2pix" else 4, 16, 16]
    assert unet["timestep"] == {"name": "timestep", "shape": [1], "dtype": "float32"}
    assert man["prediction_type"] == ("v_prediction" if arch == "sd21" else "epsilon")
    if arch == "sdxl":
        assert unet["time_ids"]["shape"] == [1, 6] and unet["text_embeds"]["shape"] == [1, 32]
        outs = [o["name"] for o in man["submodels"]["text_encoder_2"]["outputs"]]
        assert outs[:2] == ["last_hidden_state", "text_embeds"] and "hidden_states.1" in outs
        assert (out / "tokenizer_2" / "tokenizer.json").is_file()


@pytest.mark.slow  # dynamo exports: 9-26 s of CPU per arch
@pytest.mark.parametrize("arch", list(ALL))
def test_dynamo_export_matches_torch(tiny_onnx, arch):
    subs = DYNAMO_DISTINCT[arch]
    out = tiny_onnx(arch, "dynamo", submodels=subs)
    _check_dir(out, arch, "dynamo", ALL[arch] if subs is None else subs.split(","))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sd21", "sdxl", "pix2pix"])
def test_dynamo_export_whole_pipelines(tiny_onnx, arch):
    _check_dir(tiny_onnx(arch, "dynamo"), arch, "dynamo", ALL[arch])


@pytest.mark.parametrize("fixture", ["tiny_sd15_onnx", pytest.param("tiny_sd15_onnx_dynamo", marks=pytest.mark.slow)])
def test_exported_graphs_match_torch_on_fresh_inputs(request, fixture, tiny_sd15_pipeline):
    """An independent check of the manifest's numbers: other inputs, torch modules loaded anew."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from sdgraph.ir.runtime import compare, run

    out = request.getfixturevalue(fixture)
    rng = np.random.default_rng(123)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15_pipeline, subfolder="unet").eval()
    te = CLIPTextModel.from_pretrained(tiny_sd15_pipeline, subfolder="text_encoder").eval()
    vae = AutoencoderKL.from_pretrained(tiny_sd15_pipeline, subfolder="vae").eval()
    x = rng.standard_normal((1, 4, 16, 16)).astype(np.float32)
    t = np.array([321.0], dtype=np.float32)
    ctx = rng.standard_normal((1, 77, 32)).astype(np.float32)
    ids = rng.integers(0, 2048, (1, 77)).astype(np.int64)
    with torch.no_grad():
        ref = {
            "unet": {"out_sample": unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample},
            "text_encoder": {"last_hidden_state": te(torch.from_numpy(ids)).last_hidden_state},
            "vae_decoder": {"sample": vae.decode(torch.from_numpy(x)).sample},
        }
    feeds = {"unet": {"sample": x, "timestep": t, "encoder_hidden_states": ctx},
             "text_encoder": {"input_ids": ids}, "vae_decoder": {"latent_sample": x}}
    for name, r in ref.items():
        got = run(out / name / "model.onnx", feeds[name])
        rep = compare({k: v.numpy() for k, v in r.items()}, got)
        assert all(v["max_rel"] <= TOL for v in rep.values()), (name, rep)


@pytest.mark.slow  # a dynamic-shape export
def test_dynamic_axes_run_at_other_shapes(tiny_onnx):
    from sdgraph.ir.runtime import run

    out = tiny_onnx("sdxl", "legacy", dynamic=True, submodels="text_encoder_2,unet")
    man = json.loads((out / "sdgraph.json").read_text())
    unet = man["submodels"]["unet"]
    assert unet["inputs"][0]["shape"] == ["batch", 4, "height", "width"]
    assert [s["sample"][0] for s in unet["parity"]["shapes_checked"]] == [1, 2]  # a second batch was checked
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((3, 4, 24, 32)).astype(np.float32),
             "timestep": np.full((3,), 10.0, np.float32),
             "encoder_hidden_states": rng.standard_normal((3, 77, 64)).astype(np.float32),
             "text_embeds": rng.standard_normal((3, 32)).astype(np.float32),
             "time_ids": np.tile(np.array([[192, 256, 0, 0, 192, 256]], np.float32), (3, 1))}
    assert run(out / "unet" / "model.onnx", feeds)["out_sample"].shape == (3, 4, 24, 32)


def test_taesd_as_vae(tiny_sd15_pipeline, tiny_taesd, tmp_path):
    out = tmp_path / "taesd-onnx"
    man = export_pipeline(tiny_sd15_pipeline, out, vae=tiny_taesd, submodels="vae_encoder,vae_decoder")
    assert man["vae"]["class"] == "AutoencoderTiny" and man["vae"]["scaling_factor"] == 1.0
    assert json.loads((out / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderTiny"]
    for name in ("vae_encoder", "vae_decoder"):
        assert man["submodels"][name]["class"] == "AutoencoderTiny"
        assert man["submodels"][name]["parity"]["worst"]["max_rel"] <= TOL
    assert man["submodels"]["vae_decoder"]["outputs"][0]["shape"] == [1, 3, 128, 128]


@pytest.mark.slow  # one more export of the pipeline
def test_classic_attention_exports_at_opset_13(tiny_sd15_pipeline, tmp_path):
    man = export_pipeline(tiny_sd15_pipeline, tmp_path / "o13", opset=13, attention="classic",
                          submodels="text_encoder,unet")
    assert man["opset"] == 13 and man["attention"] == "classic"
    assert all(s["parity"]["worst"]["max_rel"] <= TOL for s in man["submodels"].values())


# --------------------------------------------------------------------------- OpenVINO cross-check
@pytest.mark.slow  # an OpenVINO compile per export, plus the dynamo and SDXL exports
@pytest.mark.parametrize("fixture", ["tiny_sd15_onnx", "tiny_sd15_onnx_dynamo", "tiny_sdxl_onnx"])
def test_openvino_reads_the_exports(request, fixture):
    ov = pytest.importorskip("openvino")
    out = request.getfixturevalue(fixture)
    for name in ("text_encoder", "unet", "vae_decoder"):
        model = ov.convert_model(str(out / name / "model.onnx"))
        assert len(model.outputs) >= 1 and model.get_parameters()


def test_openvino_runs_the_unet_like_ort(tiny_unet_onnx):
    ov = pytest.importorskip("openvino")
    from sdgraph.ir.runtime import compare, run, seeded_inputs

    feeds = seeded_inputs(tiny_unet_onnx, seed=1)
    compiled = ov.Core().compile_model(ov.convert_model(str(tiny_unet_onnx)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = compiled(feeds)[compiled.output(0)]
    rep = compare(run(tiny_unet_onnx, feeds), {"out_sample": got})
    assert rep["out_sample"]["max_rel"] < 1e-4


# --------------------------------------------------------------------------- CLI
@pytest.mark.slow  # a whole export in a child process: ~20 s of CPU
def test_cli_export_prints_a_summary_and_writes_the_manifest(tiny_sd15_pipeline, tmp_path):
    out = tmp_path / "cli-out"
    res = sdgraph("export", tiny_sd15_pipeline, "-o", out, "--submodels", "text_encoder")
    assert res.returncode == 0, res.stderr
    assert "text_encoder" in res.stdout and "max rel err" in res.stdout and "export s" in res.stdout
    assert json.loads((out / "sdgraph.json").read_text())["submodels"]["text_encoder"]["nodes"] > 0
    # not empty: refused without --force, replaced with it
    res = sdgraph("export", tiny_sd15_pipeline, "-o", out, "--submodels", "text_encoder")
    _one_line_error(res, 2, "not empty (use --force")
    res = sdgraph("export", tiny_sd15_pipeline, "-o", out, "--submodels", "unet", "--force")
    assert res.returncode == 0, res.stderr
    assert sorted(json.loads((out / "sdgraph.json").read_text())["submodels"]) == ["unet"]
    assert not (out / "text_encoder").exists()


@pytest.mark.slow  # builds a demo model in a child process: ~14 s of CPU
def test_cli_demo_model(tmp_path):
    res = sdgraph("demo-model", "-o", tmp_path / "p", "--arch", "pix2pix")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "p" / "unet" / "config.json").read_text())["in_channels"] == 8
    _one_line_error(sdgraph("demo-model", "-o", tmp_path / "q", "--arch", "sd3"), 2, "unknown demo arch")
    _one_line_error(sdgraph("demo-model", "-o", tmp_path / "q", "--size", "huge"), 2, "unknown demo size")
    _nothing_written(tmp_path / "q")


# --------------------------------------------------------------------------- bad input
def _broken_copy(src: Path, dst: Path, drop: str | None = None, index: dict | None = None) -> Path:
    shutil.copytree(src, dst)
    if drop:
        shutil.rmtree(dst / drop)
    if index:
        data = json.loads((dst / "model_index.json").read_text())
        data.update(index)
        (dst / "model_index.json").write_text(json.dumps(data))
    return dst


def test_cli_bad_inputs_one_line_each(tiny_sd15_pipeline, tmp_path):
    out = tmp_path / "out"
    not_pipe = tmp_path / "plain"
    not_pipe.mkdir()
    (not_pipe / "x.txt").write_text("hi")
    cases = [
        ((tmp_path / "missing",), 2, "no such directory"),
        ((not_pipe,), 2, "not a diffusers pipeline directory"),
        ((_broken_copy(tiny_sd15_pipeline, tmp_path / "nounet", drop="unet"),), 2, "missing submodel folder unet/"),
        ((_broken_copy(tiny_sd15_pipeline, tmp_path / "kandinsky", index={"_class_name": "KandinskyPipeline"}),),
         2, "unknown pipeline family 'KandinskyPipeline'"),
        ((tiny_sd15_pipeline, "--opset", "13"), 2, "use --opset 14"),
        ((tiny_sd15_pipeline, "--exporter", "onnx"), 2, "unknown exporter"),
        ((tiny_sd15_pipeline, "--submodels", "unet,decoder"), 2, "unknown submodel decoder"),
        ((tiny_sd15_pipeline, "--height", "100"), 2, "multiple of 8"),
        ((tiny_sd15_pipeline, "--vae", tmp_path / "novae"), 2, "no such VAE directory"),
    ]
    for args, code, match in cases:
        res = sdgraph("export", *args, "-o", out)
        _one_line_error(res, code, match)
        _nothing_written(out)
    res = sdgraph("export", tiny_sd15_pipeline, "-o", tiny_sd15_pipeline / "onnx")
    _one_line_error(res, 2, "lies inside the input folder")
    assert not (tiny_sd15_pipeline / "onnx").exists()


def test_opset_13_message_names_the_fixes(tiny_sd15_pipeline, tmp_path):
    with pytest.raises(UsageError) as err:
        export_pipeline(tiny_sd15_pipeline, tmp_path / "o", opset=13)
    msg = str(err.value)
    assert "scaled_dot_product_attention needs opset 14" in msg and "--attention classic" in msg and "\n" not in msg


def test_dynamo_cannot_go_below_its_opset(tiny_sd15_pipeline, tmp_path):
    with pytest.raises(UsageError, match="dynamo exporter cannot produce opset 14.*--exporter legacy"):
        export_pipeline(tiny_sd15_pipeline, tmp_path / "o", exporter="dynamo", opset=14, submodels="text_encoder")
    _nothing_written(tmp_path / "o")


def test_parity_failure_fails_the_export_with_numbers(tiny_sd15_pipeline, tmp_path):
    with pytest.raises(VerificationError, match=r"text_encoder: ONNX output .* max_rel [0-9.e-]+ > 1e-12 \(max_abs"):
        export_pipeline(tiny_sd15_pipeline, tmp_path / "o", submodels="text_encoder", tolerance=1e-12)
    _nothing_written(tmp_path / "o")


def test_a_submodel_the_pipeline_lacks(tiny_sd15_pipeline, tmp_path):
    with pytest.raises(InputError, match="has no text_encoder_2"):
        export_pipeline(tiny_sd15_pipeline, tmp_path / "o", submodels="text_encoder_2")
    _nothing_written(tmp_path / "o")


def test_hub_id_without_a_network_is_one_line(tmp_path, monkeypatch):
    import socket

    def no_dns(*a, **k):
        raise socket.gaierror("no network")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(InputError, match="not a local directory, and the hub .* cannot be reached"):
        export_pipeline("someorg/some-pipeline", tmp_path / "o")
    _nothing_written(tmp_path / "o")
