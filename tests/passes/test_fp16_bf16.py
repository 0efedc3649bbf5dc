"""bf16 / fp16: casts with block lists, overflow check and NaN scan, on tiny SD submodels and planted graphs."""

from __future__ import annotations

import numpy as np
import pytest

from sdgraph.errors import InputError, UsageError, VerificationError
from sdgraph.ir import runtime as rt
from sdgraph.ir.model import Model
from sdgraph.passes._precision import run_any
from sdgraph.passes.base import create_pass
from tests.passes.precision_models import tiny_sd15_dir

OVERFLOW = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[4, 8] x) => (float[4, 8] y) {
  k1 = Constant <value = float {20.0}> ()
  k2 = Constant <value = float {0.5}> ()
  a = Mul (x, k1)
  e = Exp (a)
  b = Mul (e, k2)
  y = Add (b, x)
}
"""


@pytest.fixture(scope="module")
def sd():
    return tiny_sd15_dir()


def _dtype_of_input(model, op, index=0):
    return {np.dtype(n.inputs[index].dtype) for n in model.graph.nodes if n.op == op}


def test_fp16_unet_structure_and_numbers(sd):
    m = Model.load(sd / "unet" / "model.onnx")
    feeds = rt.seeded_inputs(m, 4)
    ref = rt.run(m, feeds)
    ins = [(t.name, t.dtype) for t in m.graph.inputs]
    outs = [(t.name, t.dtype) for t in m.graph.outputs]
    res = create_pass("fp16").run(m)
    assert res.modified and res.stats["low_nodes"] > 0 and res.stats["nan_scan"] == "onnxruntime"
    assert [(t.name, t.dtype) for t in m.graph.inputs] == ins and [(t.name, t.dtype) for t in m.graph.outputs] == outs
    assert _dtype_of_input(m, "Conv") == {np.dtype(np.float16)}
    assert {np.dtype(n.inputs[1].dtype) for n in m.graph.nodes if n.op == "Conv"} == {np.dtype(np.float16)}  # weights
    for op in ("Softmax", "LayerNormalization", "InstanceNormalization"):
        assert _dtype_of_input(m, op) == {np.dtype(np.float32)}, op
    # the time embedding stays float32 (sinusoid arguments reach ~1000)
    assert all(np.dtype(n.inputs[0].dtype) == np.float32 for n in m.graph.nodes if "time_emb" in n.name and n.op == "Gemm")
    got = rt.run(m, feeds)  # ONNX Runtime's CPU provider runs the fp16 graph
    assert rt.worst(rt.compare(ref, got))["cosine"] > 0.999


def test_fp16_keeps_vae_decoder_unless_forced(sd):
    m = Model.load(sd / "vae_decoder" / "model.onnx")
    before = m.op_histogram()
    res = create_pass("fp16").run(m)
    assert not res.modified and res.stats["kept_role"] == "vae_decoder" and m.op_histogram() == before
    res = create_pass("fp16", named={"force": "true"}).run(m)
    assert res.modified and m.op_histogram()["Cast"] > before["Cast"]


@pytest.mark.slow  # an OpenVINO bf16 compile: ~17 s of CPU
def test_bf16_unet_runs_in_openvino_not_ort(sd):
    pytest.importorskip("openvino")
    m = Model.load(sd / "unet" / "model.onnx")
    feeds = rt.seeded_inputs(m, 4)
    ref = rt.run(m, feeds)
    res = create_pass("bf16").run(m)
    assert res.modified and res.stats["nan_scan"] == "openvino"
    with pytest.raises(InputError, match="ONNX Runtime cannot load"):  # no bf16 Conv kernel on ORT CPU
        rt.session(m)
    got, used = run_any(m, feeds)
    assert used == "openvino"
    assert rt.worst(rt.compare(ref, got))["cosine"] > 0.999


def test_text_encoder_mask_kept_by_overflow_check(sd):
    m = Model.load(sd / "text_encoder" / "model.onnx")
    res = create_pass("fp16").run(m)
    assert res.stats["overflow_nodes"] >= 2  # CLIP's causal mask holds float32's minimum
    assert any("would overflow" in n for n in res.notes)
    masked = [n for n in m.graph.nodes if n.op == "Where"]
    assert masked and all(np.dtype(n.outputs[0].dtype) == np.float32 for n in masked)
    out = rt.run(m, rt.seeded_inputs(m, 0))
    assert all(np.isfinite(v).all() for v in out.values())


def test_nan_scan_names_the_overflowing_node():
    m = Model.from_onnx_text(OVERFLOW)
    with pytest.raises(VerificationError, match=r"first produced by node 'node_e' \(Exp\), whose float32 output overflows fp16"):
        _name(m)
        create_pass("fp16", named={"overflow_check": "false"}).run(m)


def test_overflow_check_keeps_node_in_float32():
    m = Model.from_onnx_text(OVERFLOW)
    _name(m)
    feeds = {"x": np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)}
    ref = rt.run(m, feeds)
    res = create_pass("fp16").run(m)
    assert res.stats["overflow_nodes"] == 2 and "node_b, node_y" in res.notes[0]  # e^40 > 65504
    for name in ("node_b", "node_y"):
        node = next(n for n in m.graph.nodes if n.name == name)
        assert np.dtype(node.outputs[0].dtype) == np.float32
    a = next(n for n in m.graph.nodes if n.name == "node_a")
    assert np.dtype(a.outputs[0].dtype) == np.float16
    got = rt.run(m, feeds)
    assert rt.worst(rt.compare(ref, got))["cosine"] > 0.9999


def test_bf16_range_covers_the_planted_overflow():
    m = Model.from_onnx_text(OVERFLOW)
    _name(m)
    res = create_pass("bf16", named={"nan_scan": "false"}).run(m)
    assert res.stats["overflow_nodes"] == 0 and res.stats["low_nodes"] == 3  # Exp is blocked


def test_keep_option():
    m = Model.from_onnx_text(OVERFLOW)
    _name(m)
    res = create_pass("fp16", named={"keep": "node_a|node_b", "nan_scan": "false"}).run(m)
    assert res.stats["low_nodes"] == 0 and res.stats["overflow_nodes"] == 1  # node_y reads e^40 (as b)
    with pytest.raises(UsageError, match="matches no node"):
        create_pass("fp16", named={"keep": "nope"}).run(Model.from_onnx_text(OVERFLOW))


def test_does_not_fire_on_integer_graph():
    m = Model.from_onnx_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (int64[4] x) => (int64[4] y) { y = Add (x, x) }
    """)
    res = create_pass("bf16").run(m)
    assert not res.modified and res.stats["low_nodes"] == 0


def _name(m):
    for n in m.graph.nodes:
        if not n.name:
            n.name = f"node_{n.outputs[0].name}"


@pytest.mark.slow  # an OpenVINO bf16 compile: ~18 s of CPU
def test_verify_bf16_through_openvino(sd):
    """--verify runs ORT; ORT cannot load bf16 graphs, so the manager compares in OpenVINO instead."""
    pytest.importorskip("openvino")
    from sdgraph.passes.manager import PassManager

    m = Model.load(sd / "vae_decoder" / "model.onnx")
    rec = PassManager("bf16", verify=True).run(m).records[-1]
    assert rec.modified and 0.999 < rec.numbers["cosine"] < 1.0
    m = Model.load(sd / "vae_decoder" / "model.onnx")
    before = m.op_histogram()
    with pytest.raises(VerificationError, match="below min_cosine"):
        PassManager("bf16{min_cosine=0.99999999}", verify=True).run(m)
    assert m.op_histogram() == before  # rolled back
