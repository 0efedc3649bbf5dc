"""fa: every attention of tiny SD exports fused under --strict, numbers equal, and the cases it must leave alone."""

from __future__ import annotations

import onnx
import pytest

from sdgraph.errors import SdgraphError
from sdgraph.ir import runtime
from sdgraph.ir.model import CANONICAL_DOMAIN, Model
from sdgraph.passes.manager import PassManager
from tests.passes import fusion_models

_EXPORTS = pytest.mark.slow  # the test exports a tiny diffusers model with torch: not the fast layer

EXPORTERS = ("legacy", "dynamo")


def _fuse(path, spec="fold,fa,gn,geglu"):
    m = Model.load(path)
    before = m.op_histogram()
    ref = runtime.run(m, seed=0)
    report = PassManager(spec, strict=True).run(m)
    out = runtime.run(m, seed=0)
    return m, before, report, runtime.worst(runtime.compare(ref, out))


def _rec(report, name):
    return next(r for r in report.records if r.name == name)


# Every UNet here is exported with torch (5-20 s of CPU each): the full suite's, not the fast layer's.
@pytest.mark.parametrize("variant, exporter", [
    pytest.param(v, e, id=f"{v}-{e}", marks=_EXPORTS)
    for v in ("sd15", "sd21", "sdxl8") for e in EXPORTERS
])
def test_unet_every_attention_and_groupnorm_fused(variant, exporter):
    m, before, report, err = _fuse(fusion_models.unet(variant, exporter))
    after = m.op_histogram()
    fa, gn, geglu = _rec(report, "fa"), _rec(report, "gn"), _rec(report, "geglu")
    assert fa.expected == fa.matched == before["Softmax"] > 0
    assert gn.expected == gn.matched == before["InstanceNormalization"] > 0
    assert geglu.expected == geglu.matched == before["Erf"] > 0
    assert after["Softmax"] == after["InstanceNormalization"] == after["Erf"] == 0
    assert after[f"{CANONICAL_DOMAIN}::Attention"] == before["Softmax"]
    assert after[f"{CANONICAL_DOMAIN}::GroupNormSilu"] + after[f"{CANONICAL_DOMAIN}::GroupNorm"] == before["InstanceNormalization"]
    assert gn.stats["with_silu"] > 0
    assert err["max_rel"] <= 1e-4 and err["cosine"] > 0.999999


@pytest.mark.slow  # exports a tiny SDXL UNet
def test_sdxl_like_has_two_transformer_layers_per_block():
    m, before, report, _ = _fuse(fusion_models.unet("sdxl8", "dynamo"))
    sd15 = Model.load(fusion_models.unet("sd15", "dynamo")).op_histogram()
    assert before["Softmax"] == 2 * sd15["Softmax"]  # self + cross per layer, two layers per block
    assert Model.load(fusion_models.unet("sdxl8", "dynamo")).graph.inputs[0].shape[1] == 8


@_EXPORTS  # a tiny diffusers model through torch.onnx (fusion_models)
def test_upcast_attention_casts_are_absorbed():
    src = Model.load(fusion_models.unet("sd21", "legacy"))
    assert src.op_histogram()["Cast"] > 0
    m, _, _, err = _fuse(fusion_models.unet("sd21", "legacy"))
    heads = sorted({n.attrs["num_heads"] for n in m.graph.nodes if n.op == "Attention"})
    assert heads == [2, 4]  # per-level head counts
    assert err["max_rel"] <= 1e-4


@_EXPORTS  # a tiny diffusers model through torch.onnx (fusion_models)
def test_classic_attn_processor_heads_in_batch():
    m, before, report, err = _fuse(fusion_models.unet("classic", "legacy"))
    fa = _rec(report, "fa")
    assert fa.matched == fa.expected == before["Softmax"]
    assert fa.stats["heads_in_batch"] == before["Softmax"]
    assert err["max_rel"] <= 1e-4


@_EXPORTS  # a tiny diffusers model through torch.onnx (fusion_models)
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_clip_text_encoder_causal_mask(exporter):
    m, before, report, err = _fuse(fusion_models.text_encoder(exporter), "fold,fa")
    fa = _rec(report, "fa")
    assert fa.matched == fa.expected == 2 and fa.stats["masked"] == 2
    assert m.op_histogram()[f"{CANONICAL_DOMAIN}::AttentionMasked"] == 2
    assert err["max_rel"] <= 1e-4


@_EXPORTS  # a tiny diffusers model through torch.onnx (fusion_models)
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_vae_decoder_mid_block_attention(exporter):
    m, before, report, err = _fuse(fusion_models.vae_decoder(exporter), "fold,fa,gn")
    assert _rec(report, "fa").matched == 1
    assert _rec(report, "gn").matched == before["InstanceNormalization"] > 0
    assert err["max_rel"] <= 1e-4


@_EXPORTS  # a tiny diffusers model through torch.onnx (fusion_models)
def test_fused_scale_is_the_real_one():
    m, _, _, _ = _fuse(fusion_models.unet("sd15", "legacy"), "fold,fa")
    ref = runtime.run(m, seed=0)
    assert {round(n.attrs["scale"], 6) for n in m.graph.nodes if n.op == "Attention"} == {0.5, round(8 ** -0.5, 6)}  # head dims 4 and 8
    for n in m.graph.nodes:
        if n.op == "Attention":
            n.attrs["scale"] *= 3
    assert runtime.worst(runtime.compare(ref, runtime.run(m, seed=0)))["max_rel"] > 1e-3


@_EXPORTS  # a tiny diffusers model through torch.onnx (fusion_models)
def test_optimized_model_saves_and_reloads(tmp_path):
    m, _, _, _ = _fuse(fusion_models.unet("sd15", "dynamo"), "fa")
    out = m.save(tmp_path / "unet")
    proto = onnx.load(str(out), load_external_data=False)
    assert {f.name for f in proto.functions} >= {"Attention"}
    assert runtime.run(Model.load(out), seed=0)


# -- does not fire -------------------------------------------------------------------------------
def _attn_text(softmax_axis=-1, scale_input="sc", extra_use=False):
    out_decl = ", float[1,2,4,4] p2" if extra_use else ""
    extra = "p2 = Identity(p)" if extra_use else ""
    return f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,2,4,8] q, float[1,2,8,4] kt, float[1,2,4,8] v, float[1] s) => (float[1,2,4,8] y{out_decl}) {{
  sc = Constant<value = float[1] {{0.35}}>()
  qk = MatMul(q, kt)
  z = Mul(qk, {scale_input})
  p = Softmax<axis={softmax_axis}>(z)
  {extra}
  y = MatMul(p, v)
}}"""


def _run_fa(text, debug=True, strict=False):
    m = Model.from_onnx_text(text)
    ref = runtime.run(m, seed=1)
    report = PassManager("fa", strict=strict, debug=debug).run(m)
    return m, report.records[0], ref


def test_small_graph_fires_with_key_transpose_inserted():
    m, rec, ref = _run_fa(_attn_text())
    assert (rec.expected, rec.matched) == (1, 1)
    node = next(n for n in m.graph.nodes if n.op == "Attention")
    assert node.attrs["scale"] == pytest.approx(0.35)
    assert runtime.worst(runtime.compare(ref, runtime.run(m, seed=1)))["max_rel"] <= 1e-5


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"softmax_axis": 2}, "not the last axis"),
        ({"scale_input": "s"}, "not a constant"),
        ({"extra_use": True}, "consumers"),
    ],
)
def test_does_not_fire(kwargs, reason):
    m, rec, _ = _run_fa(_attn_text(**kwargs))
    assert (rec.expected, rec.matched) == (1, 0)
    assert m.op_histogram()["Softmax"] == 1 and not any(n.domain == CANONICAL_DOMAIN for n in m.graph.nodes)
    assert rec.near_misses and reason in rec.near_misses[0][1]


def test_softmax_that_is_not_attention():
    text = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,10] x) => (float[2,10] y) {
  y = Softmax<axis=-1>(x)
}"""
    m, rec, _ = _run_fa(text)
    assert (rec.expected, rec.matched) == (1, 0)
    assert "graph input" in rec.near_misses[0][1]


def test_strict_fails_on_unmatched_and_rolls_back():
    m = Model.from_onnx_text(_attn_text(softmax_axis=2))
    with pytest.raises(SdgraphError, match="strict"):
        PassManager("fa", strict=True).run(m)
    assert m.op_histogram()["Softmax"] == 1


def test_mixed_precision_cast_is_a_near_miss():
    text = """
<ir_version: 8, opset_import: ["" : 17]>
g (float16[1,2,4,8] q, float[1,2,8,4] kt, float[1,2,4,8] v) => (float[1,2,4,8] y) {
  sc = Constant<value = float[1] {0.35}>()
  qc = Cast<to=1>(q)
  qk = MatMul(qc, kt)
  z = Mul(qk, sc)
  p = Softmax<axis=-1>(z)
  y = MatMul(p, v)
}"""
    m, rec, _ = _run_fa(text)
    assert rec.matched == 0 and "changes dtype" in rec.near_misses[0][1]


@_EXPORTS  # a tiny diffusers model through torch.onnx (fusion_models)
def test_include_exclude_by_region():
    path = fusion_models.unet("sd15", "legacy")
    m = Model.load(path)
    rep = PassManager("fold,fa{exclude=attn2}").run(m)
    fa = _rec(rep, "fa")
    assert fa.matched == fa.stats["excluded"] == Model.load(path).op_histogram()["Softmax"] // 2
    assert m.op_histogram()["Softmax"] == fa.stats["excluded"]


@_EXPORTS  # a tiny diffusers model through torch.onnx (fusion_models)
def test_unfolded_legacy_scale_is_evaluated_without_fold():
    # the legacy exporter computes the scale as 1/sqrt(sqrt(Shape(q)[-1])) on Q and K
    path = fusion_models.unet("sd15", "legacy")
    m = Model.load(path)
    assert m.op_histogram()["Sqrt"] > 0
    rep = PassManager("fa", strict=True).run(m)
    assert rep.records[0].matched == Model.load(path).op_histogram()["Softmax"]


def _other_shapes(model) -> dict[str, tuple]:
    """Batch 2 and a non-square latent/image for every symbolic axis (the second shape checked)."""
    size = {"batch": 2, "height": 24, "width": 16}
    return {t.name: tuple(d if isinstance(d, int) and d >= 0 else size.get(str(d), 1) for d in t.shape)
            for t in model.graph.inputs}


@pytest.mark.slow  # two dynamic-shape exports of the whole pipeline
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("sub", ["unet", "text_encoder", "vae_decoder"])
def test_dynamic_shape_exports_fuse_everything(tiny_onnx, exporter, sub):
    """`sdgraph export --dynamic`: the attention scale comes from Shape(q); fold makes its static part constant."""
    path = tiny_onnx("sd15", exporter, dynamic=True, submodels=sub) / sub / "model.onnx"
    m = Model.load(path)
    assert any(not isinstance(d, int) for t in m.graph.inputs for d in t.shape)
    before = m.op_histogram()
    shapes = [None, _other_shapes(m)]
    feeds = [runtime.seeded_inputs(m, 0, s) for s in shapes]
    refs = [runtime.run(m, f) for f in feeds]
    report = PassManager("fold,fa,gn", strict=True).run(m)
    fa, gn = _rec(report, "fa"), _rec(report, "gn")
    assert fa.expected == fa.matched == before["Softmax"] > 0
    assert gn.matched == gn.expected == before.get("InstanceNormalization", 0)
    if exporter == "legacy" and sub == "unet":
        assert _rec(report, "fold").stats["partial_shape_folded"] > 0
    assert any(not isinstance(d, int) for t in m.graph.inputs for d in t.shape)  # still dynamic
    for f, ref in zip(feeds, refs):
        err = runtime.worst(runtime.compare(ref, runtime.run(m, f)))
        assert err["max_rel"] <= 1e-4 and err["cosine"] > 0.999999
