"""The ``lora`` pass against diffusers' ``fuse_lora`` (UNet) and peft's merge (text encoder), on tiny random LoRAs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sdgraph.errors import InputError, VerificationError
from sdgraph.ir.lora import PARAMS_KEY, load_lora
from sdgraph.ir.model import Model
from sdgraph.passes import PassManager
from tests.lora_models import fused_pipeline, make_lora


@pytest.fixture(scope="module")
def loras(tiny_sd15_pipeline, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("loras")
    return {"diffusers": make_lora(tiny_sd15_pipeline, d / "a.safetensors", seed=0),
            "kohya": make_lora(tiny_sd15_pipeline, d / "k.safetensors", seed=1, kohya=True, rank=2, alpha=1.0)}


def _unet_feeds(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((1, 4, 16, 16)).astype(np.float32), "timestep": np.array([500], np.int64),
            "encoder_hidden_states": rng.standard_normal((1, 77, 32)).astype(np.float32)}


def _run(model: Model, feeds: dict[str, np.ndarray], tmp: Path) -> np.ndarray:
    import onnxruntime as ort

    f = model.save(tmp / "m", force=True)
    sess = ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])
    feeds = {i.name: feeds[i.name].astype(np.float32 if "float" in i.type else np.int64) for i in sess.get_inputs()}
    return sess.run(None, feeds)[0]


def _max_rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("fmt,scale", [("diffusers", 0.8), ("kohya", 0.5)])
def test_unet_equals_diffusers_fuse_lora(tiny_sd15_pipeline, tiny_sd15_onnx, loras, tmp_path, fmt, scale):
    import torch

    model = Model.load(tiny_sd15_onnx / "unet" / "model.onnx")
    assert json.loads(model.metadata[PARAMS_KEY])["params"], "export records the parameter map"
    rec = PassManager(f"lora{{file={loras[fmt]} scale={scale}}}").run(model).records[0]
    # to_q/k/v/out (2 attentions x 2 blocks x ...), proj_in (1x1 conv) and resnet conv1 (3x3 conv)
    assert rec.stats["matched"] == rec.stats["modules"] == 44 and rec.stats["by_map"] == 44, rec.stats
    feeds = _unet_feeds()
    pipe = fused_pipeline(tiny_sd15_pipeline, [(loras[fmt], scale)])
    with torch.no_grad():
        ref = pipe.unet(*(torch.from_numpy(feeds[k]) for k in ("sample", "timestep", "encoder_hidden_states"))).sample.numpy()
    got = _run(model, feeds, tmp_path)
    base = _run(Model.load(tiny_sd15_onnx / "unet" / "model.onnx"), feeds, tmp_path)
    assert _max_rel(base, ref) > 1e-2  # the LoRA changes the output...
    assert _max_rel(got, ref) <= 1e-4  # ...exactly as diffusers fuses it


def _peft_text_encoder(pipeline: Path, lora: Path, scale: float):
    """peft's own merge on the text encoder (diffusers' text-encoder loader needs transformers' newer peft)."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors import safe_open
    from transformers import CLIPTextModel

    te = CLIPTextModel.from_pretrained(pipeline / "text_encoder")
    with safe_open(str(lora), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        sd = {k[len("text_encoder."):]: f.get_tensor(k) for k in f.keys() if k.startswith("text_encoder.")}
    cfg = {k[len("text_encoder."):]: v for k, v in meta.items() if k.startswith("text_encoder.")}
    config = LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=cfg["target_modules"])
    inject_adapter_in_model(config, te)
    set_peft_model_state_dict(te, sd)
    with torch.no_grad():
        for m in te.modules():
            if hasattr(m, "merge") and hasattr(m, "scale_layer"):
                m.scale_layer(scale)
                m.merge()
    return te


def test_text_encoder_equals_peft_merge(tiny_sd15_pipeline, tiny_sd15_onnx, loras, tmp_path):
    import torch

    model = Model.load(tiny_sd15_onnx / "text_encoder" / "model.onnx")
    rec = PassManager(f"lora:{loras['diffusers']}").run(model).records[0]
    assert rec.stats["matched"] == rec.stats["modules"] == 10, rec.stats
    ids = np.random.default_rng(0).integers(0, 1000, (1, 77)).astype(np.int64)
    with torch.no_grad():
        ref = _peft_text_encoder(tiny_sd15_pipeline, loras["diffusers"], 1.0)(torch.from_numpy(ids)).last_hidden_state.numpy()
    assert _max_rel(_run(model, {"input_ids": ids}, tmp_path), ref) <= 1e-4


def test_two_loras_add_up_and_dynamo_layout(tiny_sd15_pipeline, tiny_sd15_onnx, tiny_sd15_onnx_dynamo, loras, tmp_path):
    """Two LoRAs in one pipeline equal the two deltas added; the dynamo export (other names) gives the same numbers."""
    outs = []
    for src in (tiny_sd15_onnx, tiny_sd15_onnx_dynamo):
        model = Model.load(src / "unet" / "model.onnx")
        report = PassManager(f"lora{{file={loras['diffusers']} scale=0.8}},lora{{file={loras['kohya']} scale=-0.5}}").run(model)
        assert [r.stats["matched"] for r in report.records] == [44, 44]
        outs.append(_run(model, _unet_feeds(1), tmp_path))
    a, k = load_lora(loras["diffusers"]), load_lora(loras["kohya"])
    model = Model.load(tiny_sd15_onnx / "unet" / "model.onnx")
    from sdgraph.ir.lora import folded, match_weights

    for lf, s in ((a, 0.8), (k, -0.5)):
        mods = lf.for_component("unet")
        match = match_weights(model.graph, model.metadata, mods)
        by = {m.module: m for m in mods}
        for mod, ref in match.matched.items():
            ref.tensor.values = folded(ref.tensor.values, by[mod].delta(s), ref.transposed)
    expect = _run(model, _unet_feeds(1), tmp_path)
    assert _max_rel(outs[0], expect) <= 1e-6
    assert _max_rel(outs[1], expect) <= 1e-4


def test_without_the_map_by_name_then_position(tiny_sd15_onnx, loras, tmp_path):
    base = Model.load(tiny_sd15_onnx / "unet" / "model.onnx")
    want = _run(PassManager(f"lora:{loras['diffusers']}").run(base) and base, _unet_feeds(), tmp_path)

    model = Model.load(tiny_sd15_onnx / "unet" / "model.onnx")
    del model.metadata[PARAMS_KEY]
    rec = PassManager(f"lora:{loras['diffusers']}").run(model).records[0]
    assert rec.stats["by_name"] == 44 and "by_map" not in rec.stats  # the legacy exporter's node scopes
    assert _max_rel(_run(model, _unet_feeds(), tmp_path), want) == 0

    # no map, no names: shape and position; the attention projections of one shape are ambiguous
    model = Model.load(tiny_sd15_onnx / "unet" / "model.onnx")
    del model.metadata[PARAMS_KEY]
    for i, n in enumerate(model.graph.nodes):
        n.name = f"n{i}"
        for t in n.inputs:
            if t.name.endswith(".weight"):
                t.name = f"w{i}"
    rec = PassManager(f"lora:{loras['diffusers']}").run(model).records[0]
    assert rec.stats["matched"] + rec.stats["unmatched"] == 44 and rec.stats["unmatched"] > 0
    assert any("position is ambiguous" in n for n in rec.notes)
    with pytest.raises(VerificationError, match="unmatched .*strict"):
        PassManager(f"lora{{file={loras['diffusers']} strict=true}}").run(model)


def test_bad_loras(tiny_sd15_onnx, loras, tmp_path):
    model = Model.load(tiny_sd15_onnx / "unet" / "model.onnx")
    corrupt = tmp_path / "c.safetensors"
    corrupt.write_bytes(loras["diffusers"].read_bytes()[:200])
    with pytest.raises(InputError, match="not a valid safetensors file"):
        PassManager(f"lora:{corrupt}").run(model)
    from safetensors.numpy import save_file

    other = tmp_path / "other.safetensors"  # a LoRA for a wider model: same names, other shapes
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": np.ones((4, 64), np.float32),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": np.ones((64, 4), np.float32)},
              str(other))
    with pytest.raises(InputError, match="another architecture"):
        PassManager(f"lora:{other}").run(model)
    rank = tmp_path / "rank.safetensors"
    save_file({"unet.conv_in.lora_A.weight": np.ones((4, 4, 3, 3), np.float32),
               "unet.conv_in.lora_B.weight": np.ones((32, 8, 1, 1), np.float32)}, str(rank))
    with pytest.raises(InputError, match="rank mismatch"):
        PassManager(f"lora:{rank}").run(model)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"transformer.blocks.0.lora_A.weight": np.ones((4, 64), np.float32),
               "transformer.blocks.0.lora_B.weight": np.ones((64, 4), np.float32)}, str(foreign))
    with pytest.raises(InputError, match="no LoRA weights found"):
        PassManager(f"lora:{foreign}").run(model)
    nomatch = tmp_path / "nomatch.safetensors"
    save_file({"unet.single_blocks.0.linear.lora_A.weight": np.ones((4, 3), np.float32),
               "unet.single_blocks.0.linear.lora_B.weight": np.ones((5, 4), np.float32)}, str(nomatch))
    with pytest.raises(InputError, match="none of its 1 unet LoRA module"):
        PassManager(f"lora:{nomatch}").run(model)


@pytest.mark.slow
def test_end_to_end_images_equal_the_fused_pipeline(tiny_sd15_pipeline, tiny_sd15_onnx, loras, tmp_path):
    """sdgraph's images from the base export + the lora pass equal those from an export of the diffusers-fused pipeline."""
    from sdgraph.export import export_pipeline
    from sdgraph.passes.manager import optimize_path
    from sdgraph.pipeline.runner import open_pipeline

    fused = fused_pipeline(tiny_sd15_pipeline, [(loras["diffusers"], 0.8)])
    fused.save_pretrained(tmp_path / "fused-pipe")
    for extra in ("feature_extractor", "safety_checker"):
        shutil.rmtree(tmp_path / "fused-pipe" / extra, ignore_errors=True)
    export_pipeline(tmp_path / "fused-pipe", tmp_path / "fused-onnx", submodels=["text_encoder", "unet", "vae_decoder"])
    optimize_path(tiny_sd15_onnx, f"lora{{file={loras['diffusers']} scale=0.8}}", tmp_path / "ours")
    images = []
    for d in (tmp_path / "fused-onnx", tmp_path / "ours"):
        g = open_pipeline(d).generate("a red bicycle", steps=3, seed=0)
        images.append(np.asarray(g.images[0]).astype(np.int16))
    assert np.abs(images[0] - images[1]).max() <= 1
