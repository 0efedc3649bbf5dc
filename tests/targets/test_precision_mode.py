"""Precision as a target mode: ``bf16{mode=target}`` leaves the graph float32 with a recorded keep list;
OpenVINO lowers it to its bf16 inference precision with the keep list as per-layer ``precise`` rt_info,
torch runs it under autocast with the keep list outside it; a target without a mode gets the cast graph at lowering."""

from __future__ import annotations

import collections
import json
import xml.etree.ElementTree as ET

import pytest

from tests.graphs import mlp_model

from sdgraph.ir import runtime
from sdgraph.ir.model import Model
from sdgraph.passes._cast import PRECISION_MODE_KEY
from sdgraph.targets import load_artifact, lower

_FUSED = ("FullyConnected", "Subgraph", "Reshape")
SHAPE = {"sample": (1, 4, 16, 16), "timestep": (1,), "encoder_hidden_states": (1, 77, 32)}


@pytest.fixture(scope="module")
def graphs(tiny_sd15_onnx, tmp_path_factory):
    from sdgraph.passes.manager import optimize_path

    d = tmp_path_factory.mktemp("pm")
    optimize_path(tiny_sd15_onnx, "fold,fa", d / "fa", submodels=["unet"])
    optimize_path(d / "fa", "bf16{mode=target}", d / "mode", submodels=["unet"])
    return d


@pytest.mark.slow  # tiny UNet fusions and three lowerings: ~40 s on a busy 2-core machine
def test_openvino_bf16_mode_keeps_list_in_f32(graphs, tmp_path):
    ov = pytest.importorskip("openvino")

    fa, mode = Model.load(graphs / "fa" / "unet" / "model.onnx"), Model.load(graphs / "mode" / "unet" / "model.onnx")
    rec = json.loads(mode.metadata[PRECISION_MODE_KEY])
    assert rec["precision"] == "bf16" and len(rec["keep"]) > 0
    # the pass left the graph float32: no Cast added, same nodes
    assert mode.op_histogram() == fa.op_histogram()
    # precise_native=true: every kept node precise, the natively lowered attention too
    res = lower(graphs / "mode", "openvino", tmp_path / "art", submodels=["unet"],
                options={"blob": "false", "precise_native": "true"}, cache=False)
    entry = res.manifest["submodels"]["unet"]
    assert entry["precision"] == "bf16" and entry["config"]["INFERENCE_PRECISION_HINT"] == "bf16"
    assert entry["precision_mode"]["kept_nodes"] == len(rec["keep"])
    root = ET.parse(tmp_path / "art" / "unet" / "model.xml").getroot()
    types = collections.Counter(layer.get("type") for layer in root.iter("layer"))
    assert types["Convert"] == 0  # no cast chains
    precise = {layer.get("name") for layer in root.iter("layer")
               if any(a.get("name") == "precise" for a in layer.iter("attribute"))}
    assert len(precise) == entry["precision_mode"]["precise_layers"] > 0
    core = ov.Core()
    bf16_here = "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    lower(graphs / "fa", "openvino", tmp_path / "own", precision="bf16", submodels=["unet"], options={"blob": "false"},
          cache=False)

    def runtime_precisions(xml):
        compiled = core.compile_model(core.read_model(str(xml)), "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
        return {op.get_friendly_name(): (op.get_rt_info()["runtimePrecision"].astype(str), op.get_rt_info()["layerType"].astype(str))
                for op in compiled.get_runtime_model().get_ordered_ops()}

    ours, own = runtime_precisions(tmp_path / "art" / "unet" / "model.xml"), runtime_precisions(tmp_path / "own" / "unet" / "model.xml")
    kept = {n: ours[n] for n in precise if n in ours and ours[n][0] in ("f32", "bf16")}
    # layers the CPU plugin fuses (FullyConnected with its bias Add, snippets Subgraphs of elementwise ops)
    # lose the rt_info (measured; it is not copied across fusions); every other kept layer runs in f32
    unfused = {n: v for n, v in kept.items() if v[1] not in _FUSED}
    assert unfused and all(p == "f32" for p, _ in unfused.values()), {v for v in unfused.values() if v[0] != "f32"}
    if bf16_here:
        assert "bf16" in {p for p, _ in ours.values()}  # the rest really runs in bf16
        # and the keep list changed something: layers OpenVINO's own bf16 mode runs in bf16 run in f32 here
        assert any(own.get(n, ("",))[0] == "bf16" for n in unfused)
    # numbers: vs float32 in ORT and vs OpenVINO's own bf16 mode of the fa graph (the bf16 tolerance)
    feeds = runtime.seeded_inputs(fa, 0, SHAPE)
    got = load_artifact(tmp_path / "art").runner("unet")(feeds)
    ref = runtime.run(fa, feeds)
    assert runtime.worst(runtime.compare(ref, got))["cosine"] >= 0.999
    own_out = load_artifact(tmp_path / "own").runner("unet")(feeds)
    assert runtime.worst(runtime.compare(own_out, got))["cosine"] >= 0.999



@pytest.mark.slow
def test_openvino_leaves_native_canonical_ops_to_its_bf16_kernels_unless_named(graphs, tmp_path):
    pytest.importorskip("openvino")
    from sdgraph.passes.manager import optimize_path

    mode = Model.load(graphs / "mode" / "unet" / "model.onnx")
    rec = json.loads(mode.metadata[PRECISION_MODE_KEY])
    keep = rec["keep"]
    attention = sorted(n.name for n in mode.graph.nodes if n.op == "Attention" and n.name in keep)
    assert attention and rec["named"] == []  # the pass keeps the canonical attention (it holds a softmax)

    def precise_types(art):
        root = ET.parse(art / "unet" / "model.xml").getroot()
        return collections.Counter(layer.get("type") for layer in root.iter("layer")
                                   if any(a.get("name") == "precise" for a in layer.iter("attribute")))

    def entry(res):
        return res.manifest["submodels"]["unet"]["precision_mode"]

    full = entry(lower(graphs / "mode", "openvino", tmp_path / "full", submodels=["unet"],
                       options={"blob": "false", "precise_native": "true"}, cache=False))
    lean = entry(lower(graphs / "mode", "openvino", tmp_path / "lean", submodels=["unet"], options={"blob": "false"},
                       cache=False))
    assert full["kept_nodes"] == len(keep) and lean["kept_nodes"] == len(keep) - len(attention)
    assert precise_types(tmp_path / "full")["ScaledDotProductAttention"] == len(attention)
    lean_types = precise_types(tmp_path / "lean")
    assert lean_types["ScaledDotProductAttention"] == 0 and sum(lean_types.values()) == lean["precise_layers"] > 0
    assert lean["precise_layers"] < full["precise_layers"]
    # the default stays within the bf16 tolerance of float32
    fa = Model.load(graphs / "fa" / "unet" / "model.onnx")
    feeds = runtime.seeded_inputs(fa, 0, SHAPE)
    got = load_artifact(tmp_path / "lean").runner("unet")(feeds)
    assert runtime.worst(runtime.compare(runtime.run(fa, feeds), got))["cosine"] >= 0.999
    # an attention the user names in keep= stays precise by default too
    optimize_path(graphs / "fa", f"bf16{{mode=target keep={attention[0]}}}", tmp_path / "named", submodels=["unet"])
    named = Model.load(tmp_path / "named" / "unet" / "model.onnx")
    names = json.loads(named.metadata[PRECISION_MODE_KEY])["named"]  # keep= matches name fragments
    assert attention[0] in names and all(n.startswith(attention[0]) for n in names)
    res = entry(lower(tmp_path / "named", "openvino", tmp_path / "named-art", submodels=["unet"], options={"blob": "false"},
                      cache=False))
    assert res["kept_nodes"] == lean["kept_nodes"] + len(names)
    assert precise_types(tmp_path / "named-art")["ScaledDotProductAttention"] == 1

def _mlp(spec: str) -> Model:
    from sdgraph.passes.manager import PassManager

    m = Model.from_proto(mlp_model())
    PassManager(spec).run(m)
    return m


def test_pass_records_mode_and_target_without_one_gets_cast_graph():
    from sdgraph.targets.base import LowerContext, Target
    from sdgraph.targets.driver import _precision_mode, graph_precision
    from sdgraph.targets.torch import TorchTarget

    m = _mlp("bf16{mode=target keep=mm2}")
    assert json.loads(m.metadata[PRECISION_MODE_KEY]) == {"precision": "bf16", "keep": ["mm2"], "named": ["mm2"]}
    assert m.op_histogram()["Cast"] == 0 and graph_precision(m) == "bf16"
    ctx = LowerContext(precision="bf16")
    _precision_mode(m, TorchTarget(), ctx, None)  # has a bf16 mode: graph untouched, keep list handed over
    assert ctx.precision_keep == ("mm2",) and ctx.precision_named == ("mm2",) and m.op_histogram()["Cast"] == 0
    ctx = LowerContext(precision="fp32")
    _precision_mode(m, Target(), ctx, None)  # no mode: the cast graph, mm2 kept in float32
    assert ctx.precision_keep is None and PRECISION_MODE_KEY not in m.metadata
    low = {n.name for n in m.graph.nodes if any("bfloat16" in str(o.dtype) for o in n.outputs)}
    assert "mm1" in low and "mm2" not in low and m.op_histogram()["Cast"] >= 2
    m2 = _mlp("bf16{mode=target}")
    _precision_mode(m2, Target(), LowerContext(precision="fp32"), "fp32")  # --precision fp32 asked: stays float32
    assert m2.op_histogram()["Cast"] == 0


def test_torch_autocast_mode_runs_keep_list_in_float32(tmp_path):
    """torch: the float32 graph under bf16 autocast; kept nodes with autocast disabled. Keeping both MatMuls
    of the MLP gives float32's numbers, keeping none gives bf16's."""
    base = Model.from_proto(mlp_model())
    feeds = runtime.seeded_inputs(base, 0)
    ref = runtime.run(base, feeds)
    errs = {}
    for spec in ("bf16{mode=target}", "bf16{mode=target keep=mm1|mm2}"):
        f = tmp_path / f"m{len(spec)}.onnx"
        _mlp(spec).save(f)
        res = lower(f, "torch", tmp_path / f"a{len(spec)}", options={"mode": "eager"}, cache=False)
        entry = res.manifest["submodels"]["model"]
        assert entry["precision"] == "bf16"
        got = load_artifact(tmp_path / f"a{len(spec)}").runner()(feeds)
        errs[len(entry["precision_keep"])] = runtime.worst(runtime.compare(ref, got))
    assert errs[0]["cosine"] >= 0.999 and errs[0]["max_rel"] > 1e-4  # really bf16
    assert errs[2]["max_rel"] <= 1e-5  # both matmuls kept: float32
    code = (tmp_path / f"a{len('bf16{mode=target keep=mm1|mm2}')}" / "model" / "module.py").read_text()
    assert code.count("_enter_autocast(") == 2
