"""tome: structure, counts, numbers, parity with tomesd, does-not-fire and bad inputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from sdgraph.errors import UnsupportedError, UsageError, VerificationError
from sdgraph.ir import runtime
from sdgraph.ir.model import Model
from sdgraph.passes.base import create_pass
from sdgraph.passes.manager import PassManager
from sdgraph.passes.tome import tome_indices

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
tomesd = pytest.importorskip("tomesd")

# Attention at the top level (4 transformer blocks: 3 at full resolution, 1 in the mid block).
TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8,
)
BATCH, SEQ = 2, 7


class _Wrap(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def _unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(**TINY_UNET).eval()


def _feeds(h: int, w: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "sample": rng.standard_normal((BATCH, 4, h, w)).astype(np.float32),
        "timestep": np.array([10.0], dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((BATCH, SEQ, 32)).astype(np.float32),
    }


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """Tiny UNet exported by torch.onnx.export (legacy exporter, opset 17) at 16x16 and 8x12."""
    out = {}
    unet = _unet()
    for h, w in ((16, 16), (8, 12)):
        f = _feeds(h, w)
        path = tmp_path_factory.mktemp(f"tome_unet_{h}x{w}") / "model.onnx"
        with torch.no_grad():
            torch.onnx.export(
                _Wrap(unet), tuple(torch.from_numpy(f[k]) for k in ("sample", "timestep", "encoder_hidden_states")),
                str(path), input_names=["sample", "timestep", "encoder_hidden_states"], output_names=["out_sample"],
                opset_version=17, dynamo=False,
            )
        out[(h, w)] = path
    return out


def _tomesd_reference(h: int, w: int, ratio: float, **kw) -> np.ndarray:
    unet = _unet()
    tomesd.apply_patch(unet, ratio=ratio, use_rand=False, max_downsample=1, sx=2, sy=2, **kw)
    f = _feeds(h, w)
    with torch.no_grad():
        out = unet(torch.from_numpy(f["sample"]), torch.from_numpy(f["timestep"]),
                   torch.from_numpy(f["encoder_hidden_states"]), return_dict=False)[0]
    return out.numpy()


def _apply(path, spec: str, **kw):
    m = Model.load(path)
    report = PassManager(spec, **kw).run(m)
    return m, report


def _cos(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("hw", [(16, 16), (8, 12)])
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_matches_tomesd(exported, hw, ratio):
    m, report = _apply(exported[hw], f"tome{{ratio={ratio}}}")
    rec = report.records[0]
    assert rec.stats["blocks_merged"] == 3 and rec.matched == 3 and rec.expected == 3
    n = hw[0] * hw[1]
    assert rec.stats["tokens_removed"] == 3 * int(n * ratio)
    ops = m.op_histogram()
    assert ops["ai.sdgraph::TomeMerge"] == 3 and ops["ai.sdgraph::TomeUnmerge"] == 3
    got = runtime.run(m, _feeds(*hw))["out_sample"]
    ref = _tomesd_reference(*hw, ratio)
    plain = runtime.run(Model.load(exported[hw]), _feeds(*hw))["out_sample"]
    cos, err = _cos(got, ref), float(np.abs(got - ref).max())
    # Same algorithm: only float rounding separates ORT-with-tome from torch-with-tomesd ...
    assert cos >= 0.999999 and err < 1e-4, (cos, err)
    # ... while merging itself moves the output measurably (the test can fail).
    assert float(np.abs(plain - ref).max()) > 100 * err


def test_one_similarity_per_block_shared_by_its_sublayers(exported):
    """attn1, attn2 and ff of a block share one matching (tomesd's compute_merge once per block)."""
    from sdgraph.ir.canonical import inline_functions

    hw = (16, 16)
    m, report = _apply(exported[hw], "tome{ratio=0.5 attn=true crossattn=true mlp=true}")
    rec = report.records[0]
    assert rec.stats["blocks_merged"] == 3 and rec.stats["similarities"] == 3
    ops = m.op_histogram()
    assert ops["ai.sdgraph::TomeMerge"] == 3 and ops["ai.sdgraph::TomeMergeShared"] == 6
    assert ops["ai.sdgraph::TomeUnmerge"] == 9
    topk_before = ops.get("TopK", 0)
    plain_mm = Model.load(exported[hw]).op_histogram()["MatMul"]
    inline_functions(m)
    after = m.op_histogram()
    # 2 TopK (best destination, source order) and 1 similarity MatMul per block, not per sub-layer
    assert after.get("TopK", 0) - topk_before == 2 * 3
    assert after["MatMul"] - plain_mm == 3
    got = runtime.run(m, _feeds(*hw))["out_sample"]
    ref = _tomesd_reference(*hw, 0.5, merge_attn=True, merge_crossattn=True, merge_mlp=True)
    cos, err = _cos(got, ref), float(np.abs(got - ref).max())
    assert cos >= 0.999999 and err < 1e-4, (cos, err)


def test_indices_follow_tomesd_layout():
    src, dst = tome_indices(4, 6, 2, 2)
    assert dst.tolist() == [0, 2, 4, 12, 14, 16]
    assert sorted(src.tolist() + dst.tolist()) == list(range(24))
    # Rows/columns past the last full cell are all sources.
    src, dst = tome_indices(5, 5, 2, 2)
    assert dst.tolist() == [0, 2, 10, 12] and len(src) == 21
    r1 = tome_indices(8, 8, 2, 2, np.random.default_rng(3))
    r2 = tome_indices(8, 8, 2, 2, np.random.default_rng(3))
    assert all((a == b).all() for a, b in zip(r1, r2))
    assert not (r1[1] == tome_indices(8, 8, 2, 2)[1]).all()
    # one destination per cell
    assert sorted((r1[1] // 8 // 2 * 4 + r1[1] % 8 // 2).tolist()) == list(range(16))


def test_block_count_and_options(exported):
    path = exported[(16, 16)]
    m, rep = _apply(path, "tome:2")
    assert rep.records[0].stats["blocks_merged"] == 2
    assert m.op_histogram()["ai.sdgraph::TomeMerge"] == 2
    # tome:4 reaches the mid block (downsample 2) once the 3 full-resolution blocks are used
    m, rep = _apply(path, "tome:4")
    assert rep.records[0].stats["blocks_merged"] == 4
    m, rep = _apply(path, "tome{max_downsample=2}")
    assert rep.records[0].stats["blocks_merged"] == 4
    m, rep = _apply(path, "tome:1{attn=true crossattn=true mlp=true}")
    assert m.op_histogram()["ai.sdgraph::TomeMerge"] == 1 and m.op_histogram()["ai.sdgraph::TomeMergeShared"] == 2
    assert rep.records[0].stats["tokens_removed"] == 3 * 128
    out = runtime.run(m, _feeds(16, 16))["out_sample"]
    assert np.isfinite(out).all()


def test_random_is_reproducible(exported):
    path = exported[(16, 16)]
    a, _ = _apply(path, "tome{random=true seed=7}")
    b, _ = _apply(path, "tome{random=true seed=7}")
    c, _ = _apply(path, "tome{random=true seed=8}")
    d, _ = _apply(path, "tome")
    f = _feeds(16, 16)
    ya, yb, yc, yd = (runtime.run(x, f)["out_sample"] for x in (a, b, c, d))
    assert np.array_equal(ya, yb)
    assert not np.allclose(ya, yc) and not np.allclose(ya, yd)


def test_verify_reports_numbers_and_min_cosine(exported):
    path = exported[(16, 16)]
    _, rep = _apply(path, "tome", verify=True)
    num = rep.records[0].numbers
    assert 0.99 < num["cosine"] < 1.0 and num["max_abs"] > 0
    with pytest.raises(VerificationError, match="min_cosine"):
        _apply(path, "tome{min_cosine=0.9999999}", verify=True)


def test_does_not_fire_without_transformer_blocks():
    m = Model.from_onnx_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,16,8] x, float[8] s, float[8] b) => (float[2,16,8] y) {
      n = LayerNormalization<axis=-1>(x, s, b)
      r = Relu(n)
      y = Add(r, x)
    }""")
    res = create_pass("tome").run(m)
    assert not res.modified and res.stats["blocks_found"] == 0 and res.matched == 0
    assert "ai.sdgraph::TomeMerge" not in m.op_histogram()


def test_bad_inputs(exported, tmp_path):
    with pytest.raises(UsageError):
        create_pass("tome", named={"ratio": "lots"})
    with pytest.raises(UsageError):
        create_pass("tome", named={"ratio": "1.5"})
    with pytest.raises(UsageError):
        create_pass("tome", positional="-1")
    # dynamic spatial axes: one clear line, no rewrite
    proto = onnx.load(str(exported[(16, 16)]))
    for vi in list(proto.graph.input) + list(proto.graph.value_info):
        dims = vi.type.tensor_type.shape.dim
        if vi.name == "sample":
            dims[2].dim_param, dims[3].dim_param = "height", "width"
    del proto.graph.value_info[:]
    dyn = Model.from_proto(proto)
    with pytest.raises(UnsupportedError, match="static"):
        create_pass("tome").run(dyn)


def test_composes_with_fa(exported):
    """fold+fa fuse all 8 attentions whether tome runs first or last; tome's numbers do not move."""
    path = exported[(16, 16)]
    f = _feeds(16, 16)
    alone, _ = _apply(path, "tome")
    want = runtime.run(alone, f)["out_sample"]
    for spec in ("tome,fold,fa", "fold,fa,tome"):
        m, rep = _apply(path, spec)
        hist = m.op_histogram()
        assert hist["ai.sdgraph::TomeMerge"] == 3 and hist["ai.sdgraph::Attention"] == 8, spec
        assert "Softmax" not in hist, spec
        out = runtime.run(m, f)["out_sample"]
        assert np.abs(out - want).max() < 1e-4, spec


def test_estimate_and_cli(exported):
    from typer.testing import CliRunner

    from sdgraph.cli import app
    from sdgraph.passes.tome import estimate

    path = exported[(16, 16)]
    m = Model.load(path)
    n_before = m.num_nodes()
    est = estimate(m, ratio=0.5)
    assert m.num_nodes() == n_before  # the model is not changed
    assert est["blocks_merged"] == 3 and est["tokens_removed"] == 384
    assert est["gflops_after"] < est["gflops_before"] and est["merge_overhead_gflops"] > 0
    assert est["expected_speedup"] > 1.0
    lower = estimate(m, ratio=0.3)
    assert 1.0 < lower["expected_speedup"] < est["expected_speedup"]
    runner = CliRunner()
    res = runner.invoke(app, ["tome-estimate", str(path), "--ratio", "0.5", "--json"])
    assert res.exit_code == 0, res.output
    assert '"blocks_merged": 3' in res.output
    res = runner.invoke(app, ["tome-estimate", str(path), "--ratio", "1.5"])
    assert res.exit_code == 2 and "ratio" in res.output
    res = runner.invoke(app, ["tome-estimate", str(path.parent / "missing.onnx")])
    assert res.exit_code == 2 and "no such file" in res.output
