"""qdq: INT8 QDQ quantization with Stable Diffusion calibration on a tiny exported SD1.5 pipeline."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from sdgraph.quant import calibration
from sdgraph.errors import InputError, UsageError, VerificationError
from sdgraph.ir import runtime as rt
from sdgraph.ir.model import Model
from sdgraph.passes._precision import default_scope, run_any
from sdgraph.passes.base import create_pass
from sdgraph.passes.manager import PassManager
from sdgraph.passes.qdq import quantized_nodes
from tests.passes.precision_models import tiny_sd15_dir

FAST = {"calib": "2", "steps": "2", "held_out": "1"}


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("SDGRAPH_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    yield tiny_sd15_dir()
    mp.undo()


@pytest.fixture(scope="module")
def unet_int8(sd):
    m = Model.load(sd / "unet" / "model.onnx")
    scope, _ = default_scope(m)
    res = create_pass("qdq", named=dict(FAST, sensitivity="2")).run(m)
    return m, res, scope


def test_default_scope_found_structurally(sd):
    m = Model.load(sd / "unet" / "model.onnx")
    names, notes = default_scope(m)
    convs = [n.name for n in m.graph.toposort().nodes if n.op == "Conv"]
    assert notes == []  # nothing needed the name fallback
    assert convs[0] in names and convs[-1] in names  # conv_in, conv_out
    assert "conv_in" in convs[0] and "conv_out" in convs[-1]
    shortcut = [n for n in names if "conv_shortcut" in n]
    assert shortcut == ["/u/down_blocks.1/resnets.0/conv_shortcut/Conv"]  # the first resnet shortcut only
    time = {n for n in names if "time" in n}
    projs = {n.name for n in m.graph.nodes if "time_emb_proj" in n.name and n.op == "Gemm"}
    assert len(projs) == 8
    assert time == projs | {"/u/time_embedding/linear_1/Gemm", "/u/time_embedding/linear_2/Gemm"}
    assert len(names) == 3 + len(time)
    assert all("attn" not in n for n in names)  # attention proj_out 1x1 convs are not shortcuts


def test_unet_qdq_placed_outside_scope(unet_int8):
    m, res, scope = unet_int8
    q = {n.name for n in quantized_nodes(m.graph)}
    hist = m.op_histogram()
    assert res.modified and res.stats["quantized"] == len(q) > 0
    assert hist["QuantizeLinear"] == res.stats["quantize_linear"] > 0
    assert hist["DequantizeLinear"] >= hist["QuantizeLinear"]
    assert not (q & set(scope)), "a node of the ignored scope was quantized"
    convs = {n.name for n in m.graph.nodes if n.op == "Conv"}
    # every Conv outside the scope is quantized
    assert convs - set(scope) <= q
    # activation x activation MatMuls (attention scores) stay float by default
    act_mm = [n for n in m.graph.nodes if n.op == "MatMul" and n.inputs[1].inputs and n.inputs[1].inputs[0].op != "DequantizeLinear"]
    assert act_mm and not (q & {n.name for n in act_mm})
    assert res.stats["holdout_cosine"] > 0.95
    assert res.stats["calib_samples"] == 2


def test_unet_int8_runs_in_ort_and_openvino(unet_int8, sd, tmp_path):
    m, _, _ = unet_int8
    ref = Model.load(sd / "unet" / "model.onnx")
    saved = m.save(tmp_path / "int8")
    feeds = rt.seeded_inputs(ref, 3)
    want = rt.run(ref, feeds)
    got_ort = rt.run(Model.load(saved), feeds)
    pytest.importorskip("openvino")
    from sdgraph.passes._precision import _run_openvino

    got_ov = _run_openvino(Model.load(saved), feeds)
    for got in (got_ort, got_ov):
        assert rt.worst(rt.compare(want, got))["cosine"] > 0.95
    assert saved.stat().st_size + (saved.parent / "model.onnx_data").stat().st_size > 0


def test_sensitivity_report(unet_int8):
    _, res, _ = unet_int8
    sens = res.stats["sensitivity"]
    assert len(sens) == 2
    for name, one_minus_cos, max_rel in sens:
        assert isinstance(name, str) and 0 <= one_minus_cos < 0.1 and max_rel >= 0
    assert sens[0][1] >= sens[1][1]  # worst first


def test_exclude_none_quantizes_conv_in(sd):
    m = Model.load(sd / "unet" / "model.onnx")
    conv_in = next(n.name for n in m.graph.toposort().nodes if n.op == "Conv")
    create_pass("qdq", named=dict(FAST, exclude="none", held_out="0")).run(m)
    assert conv_in in {n.name for n in quantized_nodes(m.graph)}


def test_exclude_adds_names_and_rejects_unknown(sd):
    m = Model.load(sd / "unet" / "model.onnx")
    create_pass("qdq", named=dict(FAST, exclude="default|mid_block", held_out="0")).run(m)
    q = {n.name for n in quantized_nodes(m.graph)}
    assert q and not any("mid_block" in n for n in q)
    with pytest.raises(UsageError, match="matches no node"):
        create_pass("qdq", named=dict(FAST, exclude="no_such_layer")).run(Model.load(sd / "unet" / "model.onnx"))


def test_auto_exclude_needs_min_cosine_and_excludes(sd):
    with pytest.raises(UsageError, match="min_cosine"):
        create_pass("qdq", named={"auto_exclude": "true"}).requires(Model.load(sd / "unet" / "model.onnx"))
    m = Model.load(sd / "text_encoder" / "model.onnx")
    res = create_pass("qdq", named=dict(FAST, auto_exclude="true", min_cosine="0.9999999", sensitivity="4")).run(m)
    assert 1 <= len(res.stats["auto_excluded"]) <= 4
    q = {n.name for n in quantized_nodes(m.graph)}
    assert not (q & set(res.stats["auto_excluded"]))


def test_text_encoder_and_vae_decoder(sd):
    te = Model.load(sd / "text_encoder" / "model.onnx")
    r = create_pass("qdq", named=FAST).run(te)
    assert r.stats["quantized"] == sum(1 for n in quantized_nodes(te.graph)) > 0
    assert all(n.op == "MatMul" for n in quantized_nodes(te.graph))
    assert r.stats["holdout_cosine"] > 0.99
    vae = Model.load(sd / "vae_decoder" / "model.onnx")
    scope, _ = default_scope(vae)
    r = create_pass("qdq", named=FAST).run(vae)
    q = {n.name for n in quantized_nodes(vae.graph)}
    assert q and not (q & set(scope))
    assert any("post_quant_conv" in s for s in scope) and any("conv_out" in s for s in scope)
    out, used = run_any(vae, rt.seeded_inputs(vae, 1))
    assert used == "onnxruntime" and np.isfinite(out["sample"]).all()


def test_unet_calibration_data_is_a_trajectory(sd):
    unet = Model.load(sd / "unet" / "model.onnx")
    feeds = calibration.calibration_feeds(unet, 3, steps=3)
    ts = [float(f["timestep"].ravel()[0]) for f in feeds]
    assert len(set(ts)) == 3 and ts == sorted(ts, reverse=True)  # spread over the schedule
    for f in feeds:
        assert f["sample"].shape == (2, 4, 16, 16)
        ehs = f["encoder_hidden_states"]
        assert not np.allclose(ehs[0], ehs[1])  # unconditional and conditional halves
    np.testing.assert_array_equal(feeds[0]["encoder_hidden_states"][0], feeds[1]["encoder_hidden_states"][0])
    held = calibration.calibration_feeds(unet, 3, steps=3, holdout=True)
    assert not np.allclose(held[0]["sample"], feeds[0]["sample"])


def test_calibration_cache_is_reused(sd, monkeypatch):
    te = Model.load(sd / "text_encoder" / "model.onnx")
    first = calibration.calibration_feeds(te, 3)
    monkeypatch.setattr(calibration, "_make_feeds", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = calibration.calibration_feeds(te, 3)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


def test_prompt_file(sd, tmp_path):
    te = Model.load(sd / "text_encoder" / "model.onnx")
    pf = tmp_path / "p.txt"
    pf.write_text("# comment\na blue bicycle\n\n")
    feeds = calibration.calibration_feeds(te, 2, prompt_file=str(pf), use_cache=False)
    default = calibration.calibration_feeds(te, 2, use_cache=False)
    np.testing.assert_array_equal(feeds[0]["input_ids"], feeds[1]["input_ids"])  # one prompt, repeated
    assert not np.array_equal(feeds[0]["input_ids"], default[0]["input_ids"])
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(InputError, match="no prompts"):
        calibration.calibration_feeds(te, 2, prompt_file=str(empty))
    with pytest.raises(InputError, match="cannot read"):
        calibration.calibration_feeds(te, 2, prompt_file=str(tmp_path / "missing.txt"))


def test_missing_siblings_give_one_clear_error(sd, tmp_path):
    (tmp_path / "unet").mkdir()
    shutil.copy(sd / "unet" / "model.onnx", tmp_path / "unet" / "model.onnx")
    lonely = Model.load(tmp_path / "unet" / "model.onnx")
    with pytest.raises(InputError, match="needs the tokenizer"):
        create_pass("qdq", named=FAST).run(lonely)


def test_manager_verify_reports_and_min_cosine_fails(sd):
    m = Model.load(sd / "text_encoder" / "model.onnx")
    rep = PassManager("qdq{calib=2 steps=2 held_out=0}", verify=True).run(m)
    rec = rep.records[-1]
    assert rec.numbers is not None and 0.95 < rec.numbers["cosine"] < 1.0
    m2 = Model.load(sd / "text_encoder" / "model.onnx")
    with pytest.raises(VerificationError, match="min_cosine"):
        PassManager("qdq{calib=2 steps=2 held_out=0 min_cosine=0.99999999}", verify=True).run(m2)
    assert "QuantizeLinear" not in m2.op_histogram()  # rolled back


def test_default_method_is_entropy_for_the_unet_in_the_manifest(sd, tmp_path):
    """`qdq` with its default method on a model dir: the manifest records entropy for the UNet, minmax for the text encoder."""
    from sdgraph.manifest import read_manifest
    from sdgraph.passes.manager import optimize_path

    out = tmp_path / "int8"
    optimize_path(sd, "qdq{calib=2 steps=2 held_out=0}", out, submodels=["unet", "text_encoder"])
    subs = read_manifest(out)["passes"][-1]["submodels"]
    methods = {name: rec["records"][0]["stats"]["method"] for name, rec in subs.items()}
    assert methods == {"unet": "entropy", "text_encoder": "minmax"}
    assert create_pass("qdq").spec() == "qdq"  # the default is not written out
    assert create_pass("qdq", named={"method": "minmax"}).method(Model.load(sd / "unet" / "model.onnx")) == "minmax"


def test_bad_options():
    with pytest.raises(UsageError):
        create_pass("qdq", named={"method": "kl"})
    with pytest.raises(UsageError):
        create_pass("qdq", named={"calib": "0"})


def test_batch1_unet_gets_both_cfg_halves_as_samples(sd, tmp_path):
    """A batch-1 export (like sdgraph's full-size one) is calibrated on uncond and cond calls alike."""
    import torch

    from sdgraph import demo

    for sub in ("tokenizer", "scheduler", "text_encoder"):
        (tmp_path / sub).symlink_to(sd / sub)
    (tmp_path / "unet").mkdir()
    unet = demo._components("sd15", "tiny", 0)["unet"]

    class U(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.u = unet

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.u(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    with torch.no_grad():
        torch.onnx.export(U().eval(), (torch.randn(1, 4, 16, 16), torch.tensor([10.0]), torch.randn(1, 77, 32)),
                          str(tmp_path / "unet" / "model.onnx"), input_names=["sample", "timestep", "encoder_hidden_states"],
                          output_names=["out_sample"], opset_version=17, dynamo=False)
    m = Model.load(tmp_path / "unet" / "model.onnx")
    feeds = calibration.calibration_feeds(m, 8, steps=4, use_cache=False)  # 4 steps x 2 halves
    assert len(feeds) == 8 and all(f["sample"].shape == (1, 4, 16, 16) for f in feeds)
    halves = {round(float(np.abs(f["encoder_hidden_states"]).sum()), 3) for f in feeds}
    assert len(halves) == 2  # the empty prompt and the real one
    assert len({float(f["timestep"][0]) for f in feeds}) == 4


@pytest.mark.slow  # the tiny SDXL export and two text encoders: ~20 s of CPU
def test_sdxl_unet_calibration_uses_both_text_encoders(tiny_sdxl_onnx, tmp_path, monkeypatch):
    monkeypatch.setenv("SDGRAPH_CACHE_DIR", str(tmp_path / "cache"))
    unet = Model.load(tiny_sdxl_onnx / "unet" / "model.onnx")
    specs = rt.input_specs(unet)
    feeds = calibration.calibration_feeds(unet, 6, steps=3)  # batch-1 graph: 3 steps x 2 CFG halves
    te1 = rt.session(Model.load(tiny_sdxl_onnx / "text_encoder" / "model.onnx"))
    te2 = rt.session(Model.load(tiny_sdxl_onnx / "text_encoder_2" / "model.onnx"))
    width = te1.get_outputs()[0].shape[-1] + te2.get_outputs()[0].shape[-1]
    rows = []
    for f in feeds:
        assert set(f) == set(specs)
        assert f["encoder_hidden_states"].shape[-1] == width == specs["encoder_hidden_states"][0][-1]
        h, w = f["sample"].shape[-2:]
        np.testing.assert_array_equal(f["time_ids"], [[8 * h, 8 * w, 0, 0, 8 * h, 8 * w]] * len(f["sample"]))
        rows += list(zip(f["encoder_hidden_states"], f["text_embeds"]))
    # diffusers' SDXL default: the unconditional half is zeros, the conditional one is not
    uncond = [r for r in rows if not r[0].any() and not r[1].any()]
    cond = [r for r in rows if r[0].any() and r[1].any()]
    assert len(uncond) == len(cond) == len(rows) // 2 == 3
    assert len({float(f["timestep"].ravel()[0]) for f in feeds}) == 3
    # the conditional text_embeds is text_encoder_2's pooled projection of the first prompt
    from transformers import CLIPTokenizer

    tok2 = CLIPTokenizer.from_pretrained(str(tiny_sdxl_onnx / "tokenizer_2"))
    ids2 = tok2([calibration.load_prompts()[0]], padding="max_length", max_length=77, truncation=True,
                return_tensors="np").input_ids.astype(np.int64)
    out2 = dict(zip([o.name for o in te2.get_outputs()], te2.run(None, {te2.get_inputs()[0].name: ids2})))
    np.testing.assert_allclose(cond[0][1], out2["text_embeds"][0], rtol=1e-5, atol=1e-6)
    res = create_pass("qdq", named=FAST).run(unet)
    assert res.stats["quantized"] > 0 and 0.9 < res.stats["holdout_cosine"] <= 1.0
