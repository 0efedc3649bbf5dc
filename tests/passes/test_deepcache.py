"""deepcache: branches found structurally (both exporters), the two graphs' structure, parity with a torch
reference that runs the diffusers UNet's modules with the same caching, the model dir it writes, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sdgraph.errors import PassError, UsageError
from sdgraph.ir import runtime
from sdgraph.ir.model import Model
from sdgraph.passes.base import create_pass
from sdgraph.passes.deepcache import FEATURE, find_branches
from sdgraph.passes.manager import PassManager, optimize_path

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# The tiny SD1.5 UNet (sdgraph.demo): conv_in, down 0 (resnet+attention, downsample), down 1 (resnet), mid,
# up 0 (2 resnets, upsample), up 1 (2 resnets + attentions): skips 0..3 = conv_in, down0 attention, downsample, down1.
LEGACY = ["/model/up_blocks.1/Concat_1", "/model/up_blocks.1/Concat", "/model/up_blocks.0/Concat_1",
          "/model/up_blocks.0/Concat"]
LEGACY_SKIPS = ["/model/conv_in/Conv_output_0", "/model/down_blocks.0/attentions.0/Add_output_0",
                "/model/down_blocks.0/downsamplers.0/conv/Conv_output_0", "/model/down_blocks.1/resnets.0/Div_output_0"]


def _ops(model: Model, op: str) -> int:
    return sum(1 for n in model.graph.nodes if n.op == op)


def _run(unet_path, branch=0):
    model = Model.load(unet_path)
    result = create_pass("deepcache", named={"branch": branch})(model)
    return model, result


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_branches_found_structurally(exporter, tiny_sd15_onnx, tiny_sd15_onnx_dynamo):
    root = tiny_sd15_onnx if exporter == "legacy" else tiny_sd15_onnx_dynamo
    model = Model.load(root / "unet" / "model.onnx")
    branches = find_branches(model.graph)
    assert [b.index for b in branches] == [0, 1, 2, 3]
    if exporter == "legacy":
        assert [b.concat.name for b in branches] == LEGACY
        assert [b.skip.name for b in branches] == LEGACY_SKIPS
    # branch 0's skip is conv_in's output, whatever the exporter calls it
    assert branches[0].skip.inputs[0].op == "Conv" and branches[0].skip.inputs[0].inputs[0].name == "sample"
    # the up path joins the skips in reverse order: the deepest Concat comes first in the graph
    pos = {id(n): i for i, n in enumerate(model.graph.nodes)}
    assert [pos[id(b.concat)] for b in branches] == sorted((pos[id(b.concat)] for b in branches), reverse=True)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("branch, conv, attn", [(0, 7, 2), (3, 27, 6)])
def test_shallow_graph_structure(exporter, branch, conv, attn, tiny_sd15_onnx, tiny_sd15_onnx_dynamo):
    root = tiny_sd15_onnx if exporter == "legacy" else tiny_sd15_onnx_dynamo
    full, result = _run(root / "unet" / "model.onnx", branch)
    shallow = result.variants["unet_shallow"].model
    assert [t.name for t in full.graph.outputs][-1] == FEATURE and len(full.graph.outputs) == 2
    assert [t.name for t in shallow.graph.inputs] == ["sample", "timestep", "encoder_hidden_states", FEATURE]
    assert _ops(full, "Conv") == 33 and _ops(shallow, "Conv") == conv  # 33 in the whole tiny UNet
    # 4 transformer blocks (self + cross attention each): branch 0 keeps the last, then also down 0's and up 1's first
    assert _ops(full, "Softmax") == 8 and _ops(shallow, "Softmax") == attn
    assert result.stats["conv_shallow"] == conv and result.stats["branches"] == 4
    feat = result.variants["unet_shallow"].entry["feature"]
    assert (feat["channels"], feat["downscale"]) == ((32, 1), (64, 1), None, (64, 2))[branch]
    assert shallow.graph.inputs[-1].shape == [1, feat["channels"], 16 // feat["downscale"], 16 // feat["downscale"]]
    assert result.schedule == {"cache": {"interval": 3, "spacing": "uniform"},
                               "rules": [{"steps": "cache", "variant": "unet"},
                                         {"steps": "all", "variant": "unet_shallow"}]}


# -- the torch reference: diffusers' UNet modules, run with DeepCache's caching ----------------------
def _reference(unet, sample, t, ehs, branch, cached=None):
    """(noise prediction, feature entering skip ``branch``'s Concat); with ``cached`` the deep part is skipped
    (DeepCache's retrieval step: the down path only to skip ``branch``, the up path from its Concat on)."""
    shallow = cached is not None
    emb = unet.time_embedding(unet.time_proj(t).to(sample.dtype))
    h = unet.conv_in(sample)
    skips = [h]
    for blk in unet.down_blocks:
        attns = getattr(blk, "attentions", None)
        for j, resnet in enumerate(blk.resnets):
            if shallow and len(skips) > branch:
                break
            h = resnet(h, emb)
            if attns is not None:
                h = attns[j](h, encoder_hidden_states=ehs, return_dict=False)[0]
            skips.append(h)
        if blk.downsamplers is not None and not (shallow and len(skips) > branch):
            h = blk.downsamplers[0](h)
            skips.append(h)
    total = sum(len(b.resnets) for b in unet.up_blocks)
    assert shallow or len(skips) == total
    if not shallow:
        h = unet.mid_block(h, emb, encoder_hidden_states=ehs)
    k, feature = total - 1, None
    for blk in unet.up_blocks:
        attns = getattr(blk, "attentions", None)
        for j, resnet in enumerate(blk.resnets):
            if k == branch:
                feature = h if not shallow else None
                h = cached if shallow else h
            if not shallow or k <= branch:
                h = resnet(torch.cat([h, skips[k]], dim=1), emb)
                if attns is not None:
                    h = attns[j](h, encoder_hidden_states=ehs, return_dict=False)[0]
            k -= 1
        if blk.upsamplers is not None and (not shallow or k + 1 <= branch):
            h = blk.upsamplers[0](h)
    h = unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
    return h, feature


@pytest.mark.parametrize("branch", [0, 2])  # the feature at full resolution, and at half (below the upsampler)
def test_parity_with_torch_caching_reference(branch, tiny_sd15_pipeline, tiny_sd15_onnx):
    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_sd15_pipeline / "unet").eval()
    full, result = _run(tiny_sd15_onnx / "unet" / "model.onnx", branch)
    sessions = {"full": runtime.session(full), "shallow": runtime.session(result.variants["unet_shallow"].model)}

    def ort(which, feeds):
        sess = sessions[which]
        return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    rng = np.random.default_rng(branch)
    ehs = rng.standard_normal((1, 77, 32)).astype(np.float32)
    cache_steps = {0, 3}  # uniform, interval 3, over 6 steps
    ort_feat = ref_feat = None
    worst = 0.0
    for step in range(6):
        sample = rng.standard_normal((1, 4, 16, 16)).astype(np.float32)
        t = np.array([999.0 - 150 * step], dtype=np.float32)
        feeds = {"sample": sample, "timestep": t, "encoder_hidden_states": ehs}
        with torch.no_grad():
            args = (torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(ehs), branch)
            if step in cache_steps:
                ref, ref_feat = _reference(unet, *args)
                if step == 0:  # the reference's full path is the UNet itself
                    whole = unet(*args[:3], return_dict=False)[0]
                    assert float((whole - ref).abs().max()) < 1e-5
                out = ort("full", feeds)
                ort_feat = out[FEATURE]
                np.testing.assert_allclose(ort_feat, ref_feat.numpy(), rtol=0, atol=1e-4 * float(np.abs(ort_feat).max()))
            else:
                ref, _ = _reference(unet, *args, cached=ref_feat)
                out = ort("shallow", {**feeds, FEATURE: ort_feat})
        pred, ref = out["out_sample"], ref.numpy()
        rel = float(np.abs(pred - ref).max() / np.abs(ref).max())
        worst = max(worst, rel)
        assert rel <= 1e-4, (step, rel)
    # the cached steps really differ from a full call at the same inputs (the cache is used, not recomputed)
    assert worst > 0.0


def test_optimize_dir_writes_variant_and_schedule(tiny_sd15_onnx, tmp_path):
    out = tmp_path / "opt"
    reports = optimize_path(tiny_sd15_onnx, "deepcache{interval=5 branch=1 schedule=quadratic},fa", out, verify=True,
                            submodels=["unet"])
    manifest = json.loads((out / "sdgraph.json").read_text())
    assert manifest["schedule"]["unet"]["cache"] == {"interval": 5, "spacing": "quadratic"}
    entry = manifest["variants"]["unet_shallow"]
    assert entry["of"] == "unet" and entry["branch"] == 1 and entry["feature"]["input"] == FEATURE
    shallow = Model.load(out / "unet_shallow" / "model.onnx")
    assert _ops(shallow, "Softmax") == 0 and _ops(shallow, "Attention") == 6  # fa ran on the variant too
    assert reports["unet"].variants["unet_shallow"]["report"]["records"][0]["pass"] == "fa"
    # optimizing the dir again carries the variant along and runs the passes on it
    again = optimize_path(out, "cse", tmp_path / "again", submodels=["unet"])
    assert "unet_shallow" in again and (tmp_path / "again" / "unet_shallow" / "model.onnx").is_file()
    assert json.loads((tmp_path / "again" / "sdgraph.json").read_text())["variants"] == manifest["variants"]


def test_single_file_and_bad_inputs(tiny_unet_onnx, tiny_text_encoder_onnx, tmp_path):
    with pytest.raises(UsageError, match="variant graphs"):
        optimize_path(tiny_unet_onnx, "deepcache", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    model = Model.load(tiny_unet_onnx)
    with pytest.raises(PassError, match="branch 4 does not exist: the UNet has 4 skip branches"):
        create_pass("deepcache", named={"branch": 4})(model)
    create_pass("deepcache")(model)
    with pytest.raises(PassError, match="already has 'deepcache_feature'"):
        create_pass("deepcache")(model)
    with pytest.raises(UsageError, match="expected one of uniform, quadratic"):
        create_pass("deepcache", named={"schedule": "cubic"})
    with pytest.raises(UsageError, match="must be >= 1"):
        create_pass("deepcache", positional=0)
    report = PassManager("deepcache").run(Model.load(tiny_text_encoder_onnx))  # a text encoder: skipped by role
    assert report.records[0].skipped and not report.variants


@pytest.mark.slow  # exports the tiny SDXL and InstructPix2Pix UNets (~40 s)
@pytest.mark.parametrize("arch", ["sdxl", "pix2pix"])
def test_other_archs_split_exactly(arch, tiny_onnx):
    """SDXL (text_embeds/time_ids, no attention at the top level) and pix2pix (8-channel sample): the shallow
    graph fed the full graph's feature gives the full graph's prediction, for the shallowest and deepest branch."""
    root = tiny_onnx(arch, "legacy", submodels="unet")
    base = Model.load(root / "unet" / "model.onnx")
    n = len(find_branches(base.graph))
    assert n == 4
    feeds = runtime.seeded_inputs(base, 0)
    if arch == "pix2pix":
        assert feeds["sample"].shape[1] == 8
    for branch in (0, n - 1):
        full = base.copy()
        result = create_pass("deepcache", named={"branch": branch})(full)
        shallow = result.variants["unet_shallow"].model
        assert 0 < _ops(shallow, "Conv") < _ops(full, "Conv")
        out = runtime.run(full, feeds)
        cut = runtime.run(shallow, {**feeds, FEATURE: out[FEATURE]})
        ref = out["out_sample"]
        assert np.abs(cut["out_sample"] - ref).max() <= 1e-5 * np.abs(ref).max()
