"""tome on every shape: tokens equal to channels, SDXL (attention from downsample 2), --verify rollback, the axis plan."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdgraph.ir import runtime as rt
from sdgraph.ir.axes import AxisPlan
from sdgraph.ir.model import Model
from sdgraph.ir.shapes import infer_shapes
from sdgraph.passes.manager import PassManager, optimize_path
from tests.test_cli import sdgraph


def _merged_runs(src, spec: str, out, min_cos: float = 0.98) -> tuple[dict, Model]:
    """Optimize ``src`` with ``spec``; the result loads and runs in ONNX Runtime close to the input."""
    reports = optimize_path(src, spec, out)
    before = Model.load(src)
    feeds = rt.seeded_inputs(before, 1)
    after = Model.load(out)
    got = rt.run(after, feeds)  # ORT refused the old rewrite: "Incompatible dimensions for matrix multiplication"
    assert rt.worst(rt.compare(rt.run(before, feeds), got))["cosine"] > min_cos
    rec = next(r for r in list(reports.values())[0].records if r.name == "tome")
    return rec.stats, after


@pytest.mark.slow  # exports at another size or SDXL and runs the merged graph in ORT
def test_tokens_equal_channels_sd15_32x64(tiny_onnx, tmp_path):
    src = tiny_onnx("sd15", "legacy", height=32, width=64, submodels="unet") / "unet" / "model.onnx"
    m = Model.load(src)
    infer_shapes(m)
    ln = next(n for n in m.graph.nodes if n.op == "LayerNormalization")
    assert list(ln.inputs[0].shape) == [1, 32, 32]  # 4x8 latent: 32 tokens of 32 channels
    for spec in ("tome", "tome:5{crossattn=true mlp=true}", "fold,tome:5,fa"):
        stats, after = _merged_runs(src, spec, tmp_path / f"{len(spec)}.onnx")
        assert stats["blocks_merged"] >= 3, (spec, stats)
        for node in after.graph.nodes:  # every rewritten target is explicit: no -1 / 0 guessed by the runtime
            if node.op == "Reshape" and node.inputs[1].name.endswith("tome_shape"):
                assert all(int(d) > 0 for d in node.inputs[1].values), node.name


@pytest.mark.slow  # exports at another size or SDXL and runs the merged graph in ORT
def test_sdxl_default_merges_what_tomesd_does_and_says_why(tiny_sdxl_onnx, tiny_sdxl_pipeline, tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    tomesd = pytest.importorskip("tomesd")
    src = tiny_sdxl_onnx / "unet" / "model.onnx"
    m = Model.load(src)
    rep = PassManager("fold,tome").run(m)
    rec = rep.records[-1]
    assert not rec.modified and rec.stats["blocks_found"] == 8 and rec.stats["blocks_merged"] == 0
    assert any("downsample 2" in n and "tomesd" in n and "max_downsample=2" in n for n in rec.notes), rec.notes
    stats, after = _merged_runs(src, "fold,tome{max_downsample=2}", tmp_path / "t.onnx")
    assert stats["blocks_merged"] == 8
    # parity with tomesd on the same weights: max_downsample=2 merges the same blocks; 1 merges none
    feeds = rt.seeded_inputs(after, 3)
    got = rt.run(after, feeds)["out_sample"]
    plain = rt.run(src, feeds)["out_sample"]
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    for max_ds, want in ((2, got), (1, plain)):
        unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_sdxl_pipeline / "unet").eval()
        tomesd.apply_patch(unet, ratio=0.5, use_rand=False, max_downsample=max_ds, sx=2, sy=2)
        with torch.no_grad():
            ref = unet(t["sample"], t["timestep"], t["encoder_hidden_states"],
                       added_cond_kwargs={"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]}, return_dict=False)[0]
        assert np.abs(ref.numpy() - want).max() < 1e-4 * np.abs(want).max(), max_ds
    assert np.abs(got - plain).max() > 1e-3  # merging did change the numbers


@pytest.mark.slow  # exports at another size or SDXL and runs the merged graph in ORT
def test_sdxl_tome5_with_verify_exits_0(tiny_sdxl_onnx, tmp_path):
    res = sdgraph("optimize", tiny_sdxl_onnx / "unet" / "model.onnx", "--passes", "fold,tome:5,fa", "-o",
                  tmp_path / "u.onnx", "--verify")
    assert res.returncode == 0, res.stderr
    assert "5/5" in res.stdout and "cos" in res.stdout


# -- the axis plan on small graphs --------------------------------------------------------------
def _attention_block(n: int, c: int, heads: int) -> Model:
    """y[1,n,c] -> q,k,v -> [1,n,h,d] -> [1,h,n,d] -> softmax(q k^T) v -> [1,n,c] (reshape targets as constants)."""
    rng = np.random.default_rng(0)
    d = c // heads
    inits = [numpy_helper.from_array(rng.standard_normal((c, c)).astype(np.float32) / c, w) for w in ("wq", "wk", "wv")]
    inits += [numpy_helper.from_array(np.array([1, n, heads, d], np.int64), "split"),
              numpy_helper.from_array(np.array([1, n, c], np.int64), "merge")]
    nodes = [helper.make_node("MatMul", ["y", f"w{t}"], [t]) for t in "qkv"]
    nodes += [helper.make_node("Reshape", [t, "split"], [t + "4"]) for t in "qkv"]
    nodes += [helper.make_node("Transpose", [t + "4"], [t + "t"], perm=[0, 2, 1, 3]) for t in "qv"]
    nodes += [helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
              helper.make_node("MatMul", ["qt", "kt"], ["s"]), helper.make_node("Softmax", ["s"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "vt"], ["o"]),
              helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ot", "merge"], ["out"])]
    g = helper.make_graph(nodes, "blk", [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n, c])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    m = Model.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    infer_shapes(m)
    return m


@pytest.mark.parametrize("n,c,heads", [(8, 8, 2), (8, 16, 8), (6, 12, 2)])
def test_axis_plan_resizes_only_the_followed_axis(n, c, heads):
    """Tokens == channels (8, 8), tokens == heads * 1 ... : sizes never decide which axis is the tokens'."""
    m = _attention_block(n, c, heads)
    y = m.graph.inputs[0]
    plan = AxisPlan(n, n - 3)
    plan.start(y, 1)
    assert plan.build(m.graph.toposort().nodes) is None
    out = m.graph.outputs[0]
    assert plan.axes_of(out) == {1: (1, 1)}
    plan.apply("test")
    y.shape = [1, n - 3, c]
    for t in m.graph.tensors().values():
        if isinstance(t, gs.Variable) and t is not y:
            t.shape = None
    feeds = {"y": np.random.default_rng(1).standard_normal((1, n - 3, c)).astype(np.float32)}
    res = rt.run(m, feeds)["out"]
    assert res.shape == (1, n - 3, c)


def test_axis_plan_follows_batch_folded_into_heads():
    """[B, N, h, d] -> [B*h, N, d] -> [B, h, N, d]: the batch keeps its place inside the folded axis."""
    x = gs.Variable("x", np.float32, [2, 5, 3, 4])
    a = gs.Variable("a", np.float32, [2, 3, 5, 4])
    b = gs.Variable("b", np.float32, [6, 5, 4])
    c = gs.Variable("c", np.float32, [2, 3, 5, 4])
    nodes = [gs.Node("Transpose", "t", {"perm": [0, 2, 1, 3]}, [x], [a]),
             gs.Node("Reshape", "r1", {}, [a, gs.Constant("s1", np.array([6, 5, 4], np.int64))], [b]),
             gs.Node("Reshape", "r2", {}, [b, gs.Constant("s2", np.array([2, 3, 5, 4], np.int64))], [c])]
    plan = AxisPlan(2, 1)
    plan.start(x, 0)
    assert plan.build(nodes) is None
    assert plan.axes_of(b) == {0: (1, 3)} and plan.axes_of(c) == {0: (1, 1)}
    assert [v.tolist() for _, _, v in plan.rewrites] == [[3, 5, 4], [1, 3, 5, 4]]


def test_axis_plan_refuses_what_it_cannot_follow():
    x = gs.Variable("x", np.float32, [2, 8, 8])
    y = gs.Variable("y", np.float32, [2, 8, 8])
    bias = gs.Constant("bias", np.zeros((2, 8, 8), np.float32))  # fixed batch 2: would break at batch 1
    plan = AxisPlan(2, 1)
    plan.start(x, 0)
    why = plan.build([gs.Node("Add", "add", {}, [x, bias], [y])])
    assert why == "Add add: operand bias spans the axis with a fixed size 2"
    plan = AxisPlan(2, 1)
    plan.start(x, 0)
    assert "op not known" in plan.build([gs.Node("Einsum", "e", {"equation": "bij->bij"}, [x], [y])])
