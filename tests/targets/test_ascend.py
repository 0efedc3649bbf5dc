"""Ascend targets: vendor-op rewrite, static shapes, int32 timestep, the atc command via a recording fake atc."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdgraph.errors import UnsupportedError
from sdgraph.ir.canonical import make_node
from sdgraph.ir.canonical_tome import make_tome_functions
from sdgraph.ir.model import CANONICAL_DOMAIN, Model
from sdgraph.ir.runtime import seeded_inputs, session
from sdgraph.targets import get_target
from sdgraph.targets.ascend import atc_command, customize_dtypes_text, prepare, rewrite_vendor_ops
from sdgraph.targets.base import LowerContext

def attention_model(seq: int, heads: int, head_dim: int, fused: bool, batch="B", seed: int = 0, timestep: bool = True) -> Model:
    """x[B,S,C] -> q/k/v projections -> heads [B,H,S,D] -> attention -> out projection (+ timestep).

    ``fused``: the attention is one canonical ai.sdgraph::Attention (sdgraph.ir.canonical), else standard ops.
    """
    rng = np.random.default_rng(seed)
    c = heads * head_dim
    inits = [numpy_helper.from_array((rng.standard_normal((c, c)) / np.sqrt(c)).astype(np.float32), n)
             for n in ("wq", "wk", "wv", "wo")]
    inits += [numpy_helper.from_array(np.array([0, 0, heads, head_dim], np.int64), "shp"),
              numpy_helper.from_array(np.array([0, 0, c], np.int64), "flat"),
              numpy_helper.from_array(np.array(1.0 / np.sqrt(head_dim), np.float32), "sc")]
    nodes = [helper.make_node("MatMul", ["x", f"w{t}"], [t], name=f"to_{t}") for t in "qkv"]
    nodes += [helper.make_node("Reshape", [t, "shp"], [t + "h"]) for t in "qkv"]
    nodes += [helper.make_node("Transpose", [t + "h"], [t + "t"], perm=[0, 2, 1, 3]) for t in "qkv"]
    if not fused:
        nodes += [helper.make_node("Transpose", ["kt"], ["ktt"], perm=[0, 1, 3, 2]),
                  helper.make_node("MatMul", ["qt", "ktt"], ["s"]), helper.make_node("Mul", ["s", "sc"], ["ss"]),
                  helper.make_node("Softmax", ["ss"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "vt"], ["o"])]
    nodes += [helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ot", "flat"], ["a"]),
              helper.make_node("MatMul", ["a", "wo"], ["proj"], name="to_out")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, seq, c])]
    if timestep:
        inputs.append(helper.make_tensor_value_info("timestep", TensorProto.INT64, [1]))
        nodes += [helper.make_node("Cast", ["timestep"], ["tf"], to=TensorProto.FLOAT),
                  helper.make_node("Add", ["proj", "tf"], ["y"], name="add_t")]
    else:
        nodes.append(helper.make_node("Identity", ["proj"], ["y"]))
    graph = helper.make_graph(nodes, "attn", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    if fused:
        t = model.graph.tensors()
        o = gs.Variable("o", np.float32)
        make_node(model, "Attention", [t["qt"], t["kt"], t["vt"]], [o], {"num_heads": heads, "scale": float(1 / np.sqrt(head_dim))},
                  "attn1/Attention")
        next(n for n in model.graph.nodes if n.op == "Transpose" and n.inputs[0].name == "o").inputs[0] = o
        model.graph.cleanup().toposort()
    return model


def _ort(model: Model, feeds):
    sess = session(model)
    return sess.run(None, feeds)[0]


def _ctx(role="unet", b=2, seq=16, c=80, soc_opts=None, **extra_shapes):
    shapes = {"x": (b, seq, c), **extra_shapes}
    return LowerContext(shapes=[shapes], options=dict(soc_opts or {}), role=role, submodel=role)


def _hist(model: Model):
    return model.op_histogram()


# -- stage 1: still standard ONNX, still the reference ----------------------------------------
def test_prepared_graph_matches_unfused_reference_in_ort():
    ref, fused = attention_model(16, 2, 40, fused=False), attention_model(16, 2, 40, fused=True)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 16, 80)).astype(np.float32)
    want = _ort(ref, {"x": x, "timestep": np.array([7], np.int64)})
    stats = prepare(fused, _ctx())
    assert stats["timestep_int32"] == "timestep"
    ts = [t for t in fused.graph.inputs if t.name == "timestep"][0]
    assert np.dtype(ts.dtype) == np.int32
    assert [t.shape for t in fused.graph.inputs if t.name == "x"] == [[2, 16, 80]]
    got = _ort(fused, {"x": x, "timestep": np.array([7], np.int32)})
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel <= 1e-5


# -- stage 2: vendor ops -----------------------------------------------------------------------
def test_310p_attention_becomes_flash_attention_tik():
    m = attention_model(16, 2, 40, fused=True)
    prepare(m, _ctx())
    stats = rewrite_vendor_ops(m, "Ascend310P3")
    h = _hist(m)
    assert stats["flash_attention"] == 1 and h["FlashAttentionTik"] == 1
    assert h.get(f"{CANONICAL_DOMAIN}::Attention", 0) == 0 and h.get("Softmax", 0) == 0
    fa = next(n for n in m.graph.nodes if n.op == "FlashAttentionTik")
    assert fa.domain in ("", None)  # the plugin registers as ai.onnx::8..18::FlashAttentionTik
    for t in fa.inputs:  # fp16 [B, H, S, D]
        cast = t.inputs[0]
        assert cast.op == "Cast" and cast.attrs["to"] == TensorProto.FLOAT16
    assert [t.inputs[0].inputs[0].inputs[0].op for t in fa.inputs] == ["Mul", "Transpose", "Transpose"]
    q_mul = fa.inputs[0].inputs[0].inputs[0].inputs[0]  # the softmax scale moved onto q
    assert np.isclose(float(q_mul.inputs[1].values), 1 / np.sqrt(40))
    out = fa.outputs[0].outputs[0]
    assert out.op == "Cast" and out.attrs["to"] == TensorProto.FLOAT
    assert out.outputs[0].outputs[0].op == "Transpose"  # back into the exporter's [B, S, C] merge


def test_910b_attention_becomes_unpad_flash_attention_mix_at_1024_tokens():
    m = attention_model(1024, 5, 64, fused=True, timestep=False)
    ctx = LowerContext(shapes=[{"x": (2, 1024, 320)}], role="unet")
    prepare(m, ctx)
    stats = rewrite_vendor_ops(m, "Ascend910B4")
    h = _hist(m)
    assert stats["flash_attention"] == 1 and h["UnpadFlashAttentionMix"] == 1
    fa = next(n for n in m.graph.nodes if n.op == "UnpadFlashAttentionMix")
    assert len(fa.outputs) == 4
    for t in fa.inputs:  # [B, S, H, D]
        assert t.inputs[0].op == "Transpose" and list(t.inputs[0].attrs["perm"]) == [0, 2, 1, 3] and t.shape == [2, 1024, 5, 64]
    assert not any(n.op == "Mul" for n in m.graph.nodes)  # scale == 1/sqrt(D): the kernel's own
    cast = fa.outputs[0].outputs[0]
    assert cast.op == "Cast" and cast.attrs["to"] == TensorProto.FLOAT


def test_910b_does_not_fire_below_its_kernel_limits_and_inlines():
    m = attention_model(16, 2, 40, fused=True)
    prepare(m, _ctx())
    stats = rewrite_vendor_ops(m, "Ascend910B4")
    h = _hist(m)
    assert stats["flash_attention"] == 0 and stats["inlined"] == 1
    assert "UnpadFlashAttentionMix" not in h and h["Softmax"] == 1
    assert stats["kept_standard"] == ["attn1/Attention: Attention not UnpadFlashAttentionMix: head dim 40 is fine, seq 16,16 outside"][:0] or \
        "seq 16,16 outside UnpadFlashAttentionMix's 1024..4096" in stats["kept_standard"][0]
    # the fallback is the canonical body: still matches the reference
    ref = attention_model(16, 2, 40, fused=False)
    x = np.random.default_rng(3).standard_normal((2, 16, 80)).astype(np.float32)
    want = _ort(ref, {"x": x, "timestep": np.array([5], np.int64)})
    got = _ort(m, {"x": x, "timestep": np.array([5], np.int32)})
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-5


def test_310p_does_not_fire_on_head_dim_outside_list():
    m = attention_model(16, 2, 8, fused=True)
    prepare(m, _ctx(c=16))
    stats = rewrite_vendor_ops(m, "Ascend310P3")
    assert stats["flash_attention"] == 0 and "FlashAttentionTik" not in _hist(m)
    assert any("head dim 8" in s for s in stats["kept_standard"])


# -- ToMe plugin mapping (310P) ----------------------------------------------------------------
def tome_model(n=64, c=40, r=24, fn_bodies=False) -> Model:
    """x -> TomeMerge(x, metric=x, src_idx, dst_idx; r) -> Relu -> TomeUnmerge(., src_idx, dst_idx, order, node_idx) -> y."""
    na = 3 * n // 4
    graph = gs.Graph(opset=17)
    x = gs.Variable("x", np.float32, [2, n, c])
    ia = gs.Constant("idx_a", np.arange(na, dtype=np.int64))
    ib = gs.Constant("idx_b", np.arange(na, n, dtype=np.int64))
    merged, order, node_idx = (gs.Variable(nm) for nm in ("merged", "order", "node_idx"))
    h, y = gs.Variable("h"), gs.Variable("y", np.float32)
    graph.nodes = [
        gs.Node("TomeMerge", "tome1/TomeMerge", {"r": r}, [x, x, ia, ib], [merged, order, node_idx], domain=CANONICAL_DOMAIN),
        gs.Node("Relu", "relu", inputs=[merged], outputs=[h]),
        gs.Node("TomeUnmerge", "tome1/TomeUnmerge", {"r": r}, [h, ia, ib, order, node_idx], [y], domain=CANONICAL_DOMAIN),
    ]
    graph.inputs, graph.outputs = [x], [y]
    model = Model(graph, opset_imports={"": 17, CANONICAL_DOMAIN: 1})
    if fn_bodies:
        for fn in make_tome_functions(17):
            model.add_function(fn)
    return model


def test_310p_tome_becomes_tome_merged_and_unmerged():
    m = tome_model()
    stats = rewrite_vendor_ops(m, "Ascend310P3")
    h = _hist(m)
    assert stats["tome_plugin"] == 1
    assert h["TomeMerged"] == 1 and h["TomeUnmerged"] == 1 and h["FindMax"] == 1 and h["TopK"] == 1
    assert "TomeUnmerge" not in h  # the script's spelling; op_proto.h registers TomeUnmerged
    merge = next(n for n in m.graph.nodes if n.op == "TomeMerged")
    un = next(n for n in m.graph.nodes if n.op == "TomeUnmerged")
    assert merge.attrs["topRRate"] == pytest.approx(0.5) and un.attrs["topRRate"] == pytest.approx(0.5)
    assert len(merge.inputs) == 4 and len(merge.outputs) == 3 and len(un.inputs) == 5
    find_max = next(n for n in m.graph.nodes if n.op == "FindMax")
    topk = next(n for n in m.graph.nodes if n.op == "TopK")
    assert merge.inputs[2] is topk.outputs[1] and merge.inputs[3] is find_max.outputs[1]
    assert un.inputs[3] is topk.outputs[1] and un.inputs[4] is find_max.outputs[1]
    assert topk.inputs[1].values.tolist() == [48]  # every a-token sorted; topRRate picks the merged ones
    assert [n.op for n in un.inputs[1].inputs] == ["Tile"]  # Ori_IndiceA tiled over the batch
    concat = m.graph.outputs[0].inputs[0].inputs[0].inputs[0].inputs[0].inputs[0]
    assert concat.op == "Concat" and concat.inputs[0] is merge.outputs[0]


def test_910b_inlines_tome_and_still_runs():
    m = tome_model(fn_bodies=True)
    x = np.random.default_rng(2).standard_normal((2, 64, 40)).astype(np.float32)
    want = _ort(m, {"x": x})
    stats = rewrite_vendor_ops(m, "Ascend910B4")
    h = _hist(m)
    assert stats["tome_plugin"] == 0 and stats["inlined"] == 2 and "TomeMerged" not in h
    assert "ToMe plugins run on Atlas 300I Duo/Pro (310P) only" in stats["kept_standard"][0]
    assert not any(k.startswith(CANONICAL_DOMAIN) for k in h)
    np.testing.assert_allclose(_ort(m, {"x": x}), want, rtol=1e-5, atol=1e-5)


def test_910b_rejects_bodiless_tome_with_its_reason():
    m = tome_model()
    tgt = get_target("ascend910b")
    problems = tgt.check(m, LowerContext(options=tgt.parse_options({}), role="unet"))
    assert [p.op for p in problems] == ["ai.sdgraph::TomeMerge", "ai.sdgraph::TomeUnmerge"]
    with pytest.raises(UnsupportedError, match="no plugin form on Ascend910B4"):
        rewrite_vendor_ops(m, "Ascend910B4")


# -- the atc command, the files, a recording fake atc ------------------------------------------
def test_atc_command_per_role():
    unet = atc_command("atc", "model.onnx", "model", "unet", "x:2,4,8,8;timestep:1", "Ascend310P3")
    assert unet == ["atc", "--framework=5", "--model=model.onnx", "--output=model", "--input_format=NCHW",
                    "--input_shape=x:2,4,8,8;timestep:1", "--log=error", "--soc_version=Ascend310P3",
                    "--optypelist_for_implmode=Gelu,Sigmoid", "--op_select_implmode=high_performance"]
    te = atc_command("atc", "model.onnx", "model", "text_encoder", "input_ids:1,77", "Ascend910B4")
    assert "--input_format=ND" in te and not any("implmode" in a for a in te)
    vae = atc_command("atc", "model.onnx", "model", "vae_decoder", "latent_sample:1,4,8,8", "Ascend310P3", "d.cfg")
    assert vae[-1] == "--customize_dtypes=d.cfg" and "--input_format=NCHW" in vae


def test_customize_dtypes_keeps_groupnorm_fp32():
    m = Model.from_onnx_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,4,2,2] x) => (float[1,4,2,2] y) {
      s = Constant<value = float[2] {1.0, 1.0}>()
      b = Constant<value = float[2] {0.0, 0.0}>()
      r = Constant<value = int64[3] {1, 2, -1}>()
      o = Constant<value = int64[4] {1, 4, 2, 2}>()
      xr = Reshape(x, r)
      n = InstanceNormalization<epsilon = 0.00001>(xr, s, b)
      y = Reshape(n, o)
    }""")
    text = customize_dtypes_text(m)
    node = next(n for n in m.graph.nodes if n.op == "InstanceNormalization")
    assert text == f"Opname::{node.name}:InputDtype:float32,float32,float32,OutputDtype:float32\n"


@pytest.fixture
def fake_atc(tmp_path, monkeypatch):
    """A recording `atc` on PATH: appends its argv (JSON) to a log and writes the --output .om."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "atc_calls.jsonl"
    script = bindir / "atc"
    script.write_text(f"""#!{os.sys.executable}
import json, os, sys
args = sys.argv[1:]
files = sorted(os.listdir("."))
with open({str(log)!r}, "a") as f:
    f.write(json.dumps({{"args": args, "cwd_files": files}}) + "\\n")
out = [a.split("=", 1)[1] for a in args if a.startswith("--output=")][0]
open(out + ".om", "wb").write(b"OM")
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return log


def _build(target: str, model: Model, ctx: LowerContext, out: Path):
    tgt = get_target(target)
    ctx.options = tgt.parse_options(ctx.options)
    assert tgt.check(model, ctx) == []
    tgt.legalize(model, ctx)
    out.mkdir(parents=True, exist_ok=True)
    return tgt.build(model, out, ctx)


def test_build_runs_fake_atc_with_the_documented_flags(fake_atc, tmp_path):
    m = attention_model(16, 2, 40, fused=True)
    entry = _build("ascend310p", m, _ctx(), tmp_path / "unet")
    calls = [json.loads(line) for line in fake_atc.read_text().splitlines()]
    assert entry["converted"] and entry["format"] == "om" and len(calls) == 2  # batch 2 + the batch-1 CFG variant
    main, bs1 = calls[0]["args"], calls[1]["args"]
    assert main == ["--framework=5", "--model=model.onnx", "--output=model", "--input_format=NCHW",
                    "--input_shape=x:2,16,80;timestep:1", "--log=error", "--soc_version=Ascend310P3",
                    "--optypelist_for_implmode=Gelu,Sigmoid", "--op_select_implmode=high_performance"]
    assert "--input_shape=x:1,16,80;timestep:1" in bs1 and "--output=model_bs1" in bs1
    assert "model.onnx" in calls[0]["cwd_files"] and (tmp_path / "unet" / "model.om").is_file()
    saved = onnx.load(str(tmp_path / "unet" / "model.onnx"))
    ops = [n.op_type for n in saved.graph.node]
    assert ops.count("FlashAttentionTik") == 1 and "Softmax" not in ops
    ts = next(i for i in saved.graph.input if i.name == "timestep")
    assert ts.type.tensor_type.elem_type == TensorProto.INT32
    bs1_model = onnx.load(str(tmp_path / "unet" / "model_bs1.onnx"))
    assert [d.dim_value for d in bs1_model.graph.input[0].type.tensor_type.shape.dim] == [1, 16, 80]
    assert entry["legalize"]["parallel_cfg"] == "unet_bs1"
    assert "atc --framework=5" in (tmp_path / "unet" / "convert.sh").read_text()


def test_build_without_atc_writes_convert_sh(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    m = attention_model(16, 2, 40, fused=True, timestep=False)
    ctx = LowerContext(shapes=[{"x": (1, 16, 80)}], options={}, role="text_encoder", submodel="text_encoder")
    entry = _build("ascend910b", m, ctx, tmp_path / "te")
    assert not entry["converted"] and entry["format"] == "onnx+convert.sh"
    script = (tmp_path / "te" / "convert.sh").read_text().splitlines()[-1]
    assert script == ("atc --framework=5 --model=model.onnx --output=model --input_format=ND "
                      "--input_shape=x:1,16,80 --log=error --soc_version=Ascend910B4")
    assert not (tmp_path / "te" / "model_bs1.onnx").exists()


def test_check_names_inputs_needing_shape_and_opset():
    from sdgraph.targets.driver import generic_problems

    m = attention_model(16, 2, 40, fused=True)
    tgt = get_target("ascend310p")
    ctx = LowerContext(options=tgt.parse_options({}), role="unet")
    probs = generic_problems(m, tgt, ctx)
    assert [p.node for p in probs] == ["x"] and "--shape x=" in probs[0].hint
    m.opset_imports[""] = 19
    assert any("opsets 8..18" in p.reason for p in tgt.check(m, ctx))


# -- end to end: tiny exported UNet (tome:N,fa), text encoder, VAE decoder through lower() ---------
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

# heads 2 x head dim 40 at the top level (FlashAttentionTik takes D=40); 16x16 latents -> 256 tokens
TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(80, 80),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)


class _UNetWrap(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class _TextWrap(torch.nn.Module):
    def __init__(self, te):
        super().__init__()
        self.te = te

    def forward(self, input_ids):
        return self.te(input_ids, return_dict=False)[0]


class _VaeWrap(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


def _export(module, args, names, out_names, path: Path, dynamic: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(module, args, str(path), input_names=names, output_names=out_names, opset_version=17,
                          dynamo=False, dynamic_axes=dynamic or None)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A model dir (unet optimized with fold,tome:1,fa; text_encoder and vae_decoder with fold,fa) from tiny random modules."""
    from sdgraph.passes.manager import PassManager

    root = tmp_path_factory.mktemp("ascend_tiny")
    raw = root / "raw"
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**TINY_UNET).eval()
    _export(_UNetWrap(unet), (torch.randn(2, 4, 16, 16), torch.tensor([10], dtype=torch.int64), torch.randn(2, 7, 32)),
            ["sample", "timestep", "encoder_hidden_states"], ["out_sample"], raw / "unet" / "model.onnx",
            None)  # static: tome needs static token shapes
    cfg = transformers.CLIPTextConfig(hidden_size=80, intermediate_size=96, num_attention_heads=2, num_hidden_layers=1,
                                      vocab_size=100, max_position_embeddings=16)
    te = transformers.CLIPTextModel(cfg).eval()
    _export(_TextWrap(te), (torch.randint(0, 100, (1, 16)),), ["input_ids"], ["last_hidden_state"],
            raw / "text_encoder" / "model.onnx", {"input_ids": {0: "batch"}})
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                                  layers_per_block=1, sample_size=16).eval()
    _export(_VaeWrap(vae), (torch.randn(1, 4, 8, 8),), ["latent_sample"], ["sample"], raw / "vae_decoder" / "model.onnx",
            {"latent_sample": {0: "batch"}})
    opt = root / "opt"
    for sub, spec in (("unet", "fold,tome:1,fa"), ("text_encoder", "fold,fa"), ("vae_decoder", "fold,fa")):
        m = Model.load(raw / sub / "model.onnx")
        PassManager(spec).run(m)
        m.save(opt / sub)
    return raw, opt


SHAPES = {"sample": (2, 4, 16, 16), "encoder_hidden_states": (2, 7, 32), "input_ids": (1, 16), "latent_sample": (1, 4, 8, 8)}


def test_tiny_pipeline_prepared_graphs_match_ort(tiny_dir):
    """Stage 1 (static shapes, int32 timestep, before any vendor op) still matches the optimized graph in ORT."""
    raw, opt = tiny_dir
    for sub in ("unet", "text_encoder", "vae_decoder"):
        m = Model.load(opt / sub / "model.onnx")
        shapes = {t.name: SHAPES[t.name] for t in m.graph.inputs if t.name in SHAPES}
        feeds = seeded_inputs(m, 0, shapes)
        want = _ort(m, feeds)
        prepare(m, LowerContext(shapes=[shapes], role=sub, submodel=sub))
        feeds = {k: (v.astype(np.int32) if k == "timestep" else v) for k, v in feeds.items()}
        got = _ort(m, feeds)
        assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max()), sub


@pytest.mark.parametrize("target,fa_op", [("ascend310p", "FlashAttentionTik"), ("ascend910b", "UnpadFlashAttentionMix")])
def test_tiny_pipeline_lowers_for_both_socs(tiny_dir, tmp_path, fake_atc, target, fa_op):
    from sdgraph.manifest import read_manifest
    from sdgraph.targets import lower

    raw, opt = tiny_dir
    src = Model.load(opt / "unet" / "model.onnx").op_histogram()
    n_attn, n_tome = src["ai.sdgraph::Attention"], src["ai.sdgraph::TomeMerge"]
    assert n_attn == 8 and n_tome == 1
    out = tmp_path / target
    lower(opt, target, out, shapes=[SHAPES], cache=False)
    man = read_manifest(out)
    calls = [json.loads(line)["args"] for line in fake_atc.read_text().splitlines()]
    roles = {c[1]: c for c in calls}  # by --model=...
    assert len(calls) == 4  # unet, unet batch 1, text encoder, vae decoder
    unet = onnx.load(str(out / "unet" / "model.onnx"))
    ops = [n.op_type for n in unet.graph.node]
    if target == "ascend310p":
        assert ops.count("FlashAttentionTik") == n_attn and ops.count("Softmax") == 0
        assert ops.count("TomeMerged") == n_tome and ops.count("TomeUnmerged") == n_tome
    else:  # 256 tokens: below UnpadFlashAttentionMix's 1024; ToMe plugins are 310P only
        assert ops.count(fa_op) == 0 and ops.count("Softmax") == n_attn
        assert "TomeMerged" not in ops and not any(n.domain == CANONICAL_DOMAIN for n in unet.graph.node)
    assert next(i for i in unet.graph.input if i.name == "timestep").type.tensor_type.elem_type == TensorProto.INT32
    vae_call = next(c for c in calls if "--input_shape=latent_sample:1,4,8,8" in c)
    assert "--input_format=NCHW" in vae_call and any(a.startswith("--customize_dtypes=") for a in vae_call)
    cfg = (out / "vae_decoder" / "model.customize_dtypes.cfg").read_text().splitlines()
    assert cfg and all(line.startswith("Opname::") and line.endswith("OutputDtype:float32") for line in cfg)
    te_call = next(c for c in calls if "--input_shape=input_ids:1,16" in c)
    assert "--input_format=ND" in te_call and not any("implmode" in a for a in te_call)
    unet_calls = [c for c in calls if "--op_select_implmode=high_performance" in c]
    assert len(unet_calls) == 2 and all("--optypelist_for_implmode=Gelu,Sigmoid" in c for c in unet_calls)
    soc = "Ascend310P3" if target == "ascend310p" else "Ascend910B4"
    assert all(f"--soc_version={soc}" in c for c in calls)
    assert man["submodels"]["unet"]["converted"] and (out / "unet" / "model_bs1.om").is_file()
    assert roles  # every call named its model


@pytest.mark.parametrize("q_seq,kv_seq,heads,dim,soc,fires", [
    (4096, 4096, 8, 40, "Ascend910B4", True),    # SD1.5 512 px, top-level self-attention
    (4096, 77, 8, 40, "Ascend910B4", False),     # its cross-attention: 77 keys
    (1024, 1024, 8, 80, "Ascend910B4", False),   # second level: head dim 80
    (4096, 77, 8, 40, "Ascend310P3", True),      # 310P takes every SD1.5 attention (D 40/80/160)
    (256, 256, 8, 160, "Ascend310P3", True),
    (4096, 4096, 5, 64, "Ascend310P3", True),    # SD2.x head dim 64
    (4096, 4096, 10, 32, "Ascend310P3", False),  # head dim 32 is not in FlashAttentionTik's list
])
def test_fa_limits_on_sd_shapes(q_seq, kv_seq, heads, dim, soc, fires):
    from sdgraph.targets.ascend import fa_reason

    q = gs.Variable("q", np.float32, [2, heads, q_seq, dim])
    k = gs.Variable("k", np.float32, [2, heads, kv_seq, dim])
    v = gs.Variable("v", np.float32, [2, heads, kv_seq, dim])
    node = gs.Node("Attention", "a", {"num_heads": heads, "scale": dim ** -0.5}, [q, k, v], [gs.Variable("y")],
                   domain=CANONICAL_DOMAIN)
    assert (fa_reason(node, soc) is None) is fires, fa_reason(node, soc)
