"""Tiny SD1.5 UNet, text encoder and VAE decoder, before and after fold,fa,gn, lowered to ort/openvino/torch."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdgraph.ir import runtime
from sdgraph.ir.model import CANONICAL_DOMAIN, Model
from sdgraph.targets import load_artifact, lower

SUBS = ("text_encoder", "unet", "vae_decoder")
SHAPES = {"sample": (1, 4, 16, 16), "latent_sample": (1, 4, 16, 16), "timestep": (1,),
          "encoder_hidden_states": (1, 77, 32), "input_ids": (1, 77)}
TARGET_OPTIONS = {"ort": {}, "openvino": {}, "torch": {"mode": "eager"}}


@pytest.fixture(scope="session")
def tiny_dir(tiny_sd15_onnx) -> Path:
    """The shared tiny random-weight SD1.5 export (tests/conftest.py): 128 px, static shapes (fa/gn fire)."""
    return tiny_sd15_onnx


@pytest.fixture(scope="session")
def tiny_opt(tiny_dir, tmp_path_factory) -> Path:
    from sdgraph.passes.manager import optimize_path

    out = tmp_path_factory.mktemp("opt") / "onnx"
    optimize_path(tiny_dir, "fold,fa,gn", out, submodels=list(SUBS))
    return out


@pytest.fixture(scope="session")
def references(tiny_dir):
    refs = {}
    for sub in SUBS:
        m = Model.load(tiny_dir / sub / "model.onnx")
        feeds = runtime.seeded_inputs(m, 0, {k: v for k, v in SHAPES.items() if k in {t.name for t in m.graph.inputs}})
        refs[sub] = (feeds, runtime.run(m, feeds))
    return refs


def test_optimized_has_canonical_ops(tiny_opt):
    unet = Model.load(tiny_opt / "unet" / "model.onnx")
    ops = {n.op for n in unet.graph.nodes if n.domain == CANONICAL_DOMAIN}
    assert any(op.startswith("Attention") for op in ops), ops
    assert any(op.startswith("GroupNorm") for op in ops), ops


@pytest.mark.parametrize("variant", ["plain", "fold,fa,gn"])
@pytest.mark.parametrize("target", ["ort", pytest.param("openvino", marks=pytest.mark.slow), "torch"])  # OpenVINO compiles: ~11 s each
def test_lower_matches_ort_reference(target, variant, tiny_dir, tiny_opt, references, tmp_path):
    if target == "openvino":
        pytest.importorskip("openvino")
    src = tiny_dir if variant == "plain" else tiny_opt
    res = lower(src, target, tmp_path / "art", options=TARGET_OPTIONS[target], submodels=list(SUBS), cache=False)
    assert set(res.submodels) == set(SUBS)
    art = load_artifact(tmp_path / "art", target=target)
    assert art.manifest["kind"] == "sdgraph-artifact" and art.manifest["target"] == target
    assert (tmp_path / "art" / "tokenizer").is_dir() and (tmp_path / "art" / "scheduler").is_dir()
    for sub in SUBS:
        feeds, ref = references[sub]
        got = art.runner(sub)(feeds)
        worst = runtime.worst(runtime.compare(ref, got))
        assert worst["max_rel"] <= 1e-4, (target, variant, sub, worst)
    if target == "torch" and variant != "plain":
        # canonical ops reach the emitter un-inlined and map natively (Attention -> SDPA)
        assert "Attention" in " ".join(art.manifest["submodels"]["unet"]["canonical_native"])
        assert "_sdpa(" in (tmp_path / "art" / "unet" / "module.py").read_text()
    if target == "ort" and variant != "plain":
        from sdgraph.passes.base import registry

        nodes = Model.load(tmp_path / "art" / "unet" / "model.onnx").graph.nodes
        assert not any(n.domain == CANONICAL_DOMAIN for n in nodes)
        if "ort-contrib" in registry():  # canonical Attention -> com.microsoft contrib op
            assert any(n.domain == "com.microsoft" for n in nodes)


@pytest.mark.parametrize("target, options", [("torch", {"mode": "eager", "channels_last": "true"}),
                                             pytest.param("openvino", {}, marks=pytest.mark.slow)])  # OpenVINO compiles
def test_bf16_stays_close(target, options, tiny_opt, references, tmp_path):
    """bf16 is approximate: same outputs in cosine terms (OpenVINO through its precision hint, torch via autocast)."""
    if target == "openvino":
        pytest.importorskip("openvino")
    res = lower(tiny_opt, target, tmp_path / "art", precision="bf16", options=options, submodels=["unet"], cache=False)
    assert res.manifest["precision"] == "bf16" and list(res.submodels) == ["unet"]
    bf16_here = True
    if target == "openvino":
        import openvino as ov

        entry = res.manifest["submodels"]["unet"]
        assert entry["config"]["INFERENCE_PRECISION_HINT"] == "bf16"
        # CPUs without bf16 units (no avx512_bf16/AMX) compile in f32; the artifact records what it got
        bf16_here = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        assert entry["effective_precision"] == ("bf16" if bf16_here else "f32")
    feeds, ref = references["unet"]
    got = load_artifact(tmp_path / "art").runner("unet")(feeds)
    numbers = runtime.worst(runtime.compare(ref, got))
    assert numbers["cosine"] >= 0.999
    if bf16_here:
        assert numbers["max_rel"] > 1e-4  # really computed in bf16 (fp32 differs by ~1e-6)
