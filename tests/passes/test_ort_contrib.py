"""ort-contrib and the canonical ops: lowering to ORT CPU kernels, inlining, function definitions."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from sdgraph.errors import UsageError
from sdgraph.ir import canonical, runtime
from sdgraph.ir.model import CANONICAL_DOMAIN, Model
from sdgraph.passes.manager import PassManager
from tests.passes import fusion_models


@pytest.fixture(scope="module")
def fused_sd15():
    m = Model.load(fusion_models.unet("sd15", "dynamo"))
    ref = runtime.run(m, seed=0)
    PassManager("fold,fa,gn,geglu", strict=True).run(m)
    return m, ref


@pytest.mark.slow  # builds and runs a UNet before and after the lowering: ~19 s of CPU
def test_mha_lowering_removes_head_transposes(fused_sd15):
    fused, ref = fused_sd15
    m = fused.copy()
    attn = m.op_histogram()[f"{CANONICAL_DOMAIN}::Attention"]
    geglu = m.op_histogram()[f"{CANONICAL_DOMAIN}::GeGLU"]
    transposes = m.op_histogram()["Transpose"]
    rec = PassManager("ort-contrib").run(m).records[0]
    hist = m.op_histogram()
    assert rec.stats["mha"] == attn and rec.stats["gelu"] == geglu > 0
    assert hist["com.microsoft::MultiHeadAttention"] == attn and hist["com.microsoft::Gelu"] == geglu
    assert not any(n.domain == CANONICAL_DOMAIN for n in m.graph.nodes)
    assert hist["Transpose"] <= transposes - 2 * attn  # head transposes of Q and the output gone
    assert runtime.worst(runtime.compare(ref, runtime.run(m, seed=0)))["max_rel"] <= 1e-4


def test_function_impl_inlines_everything(fused_sd15):
    fused, ref = fused_sd15
    m = fused.copy()
    rec = PassManager("ort-contrib{impl=function geglu=function}").run(m).records[0]
    hist = m.op_histogram()
    assert rec.stats["mha"] == 0 and rec.stats["inlined"] > 0
    assert not any(n.domain not in (None, "", "ai.onnx") for n in m.graph.nodes)
    assert hist["Softmax"] == fused.op_histogram()[f"{CANONICAL_DOMAIN}::Attention"]
    assert runtime.worst(runtime.compare(ref, runtime.run(m, seed=0)))["max_rel"] <= 1e-4


@pytest.mark.slow  # exports a tiny CLIP text encoder with torch (fusion_models)
def test_masked_attention_falls_back_to_body():
    m = Model.load(fusion_models.text_encoder("dynamo"))
    ref = runtime.run(m, seed=0)
    PassManager("fa,ort-contrib").run(m)
    assert m.op_histogram()["Softmax"] == 2 and "com.microsoft::MultiHeadAttention" not in m.op_histogram()
    assert runtime.worst(runtime.compare(ref, runtime.run(m, seed=0)))["max_rel"] <= 1e-4


def test_bad_impl_is_one_usage_error():
    with pytest.raises(UsageError, match="impl"):
        PassManager("ort-contrib{impl=flash}")


@pytest.mark.parametrize("name", canonical.CANONICAL_OPS)
def test_function_definitions_are_valid(name):
    fn = canonical.function_proto(name, 17)
    assert fn.domain == CANONICAL_DOMAIN and fn.name == name
    assert all(n.domain in ("", None) for n in fn.node)
    onnx.checker.check_function(fn) if hasattr(onnx.checker, "check_function") else None


def test_ensure_function_is_idempotent_and_lifts_opset14():
    m = Model.from_onnx_text('<ir_version: 8, opset_import: ["" : 14]> g (float[2] x) => (float[2] y) { y = Relu(x) }')
    a = canonical.ensure_function(m, "GeGLU")
    b = canonical.ensure_function(m, "GeGLU")
    assert a is b and len(m.functions) == 1 and m.opset == 15


def test_unknown_canonical_op():
    with pytest.raises(UsageError, match="unknown canonical op"):
        canonical.function_proto("FlashAttention", 17)


def test_inline_selected_names_only(fused_sd15):
    fused, ref = fused_sd15
    m = fused.copy()
    geglu = m.op_histogram()[f"{CANONICAL_DOMAIN}::GeGLU"]
    n = canonical.inline_functions(m, only=["GeGLU"])
    hist = m.op_histogram()
    assert n == geglu > 0 and f"{CANONICAL_DOMAIN}::GeGLU" not in hist and hist[f"{CANONICAL_DOMAIN}::Attention"] > 0
    assert runtime.worst(runtime.compare(ref, runtime.run(m, seed=0)))["max_rel"] <= 1e-4


def test_attention_body_matches_numpy():
    text = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,2,3,4] q, float[1,2,5,4] k, float[1,2,5,4] v) => (float[1,2,3,4] y) {
  y = Identity(q)
}"""
    m = Model.from_onnx_text(text)
    node = m.graph.nodes[0]
    out = node.outputs[0]
    node.outputs.clear()
    canonical.make_node(m, "Attention", list(m.graph.inputs), [out], {"scale": 0.3, "num_heads": 2}, "attn")
    m.graph.cleanup().toposort()
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((1, 2, 3, 4), (1, 2, 5, 4), (1, 2, 5, 4)))
    s = q @ k.transpose(0, 1, 3, 2) * 0.3
    p = np.exp(s - s.max(-1, keepdims=True))
    want = (p / p.sum(-1, keepdims=True)) @ v
    for model in (m, _inlined(m)):
        got = runtime.run(model, {"q": q, "k": k, "v": v})["y"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _inlined(m):
    c = m.copy()
    assert canonical.inline_functions(c) == 1
    return c
