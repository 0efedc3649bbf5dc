"""Neural Engine target: the IR emitter (conf.yaml + model.bin), its numbers, bad inputs, and the runtime worker."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from sdgraph.errors import UsageError
from sdgraph.ir.model import Model
from sdgraph.ir.runtime import compare, run, seeded_inputs
from sdgraph.targets import get_target, load_artifact, lower
from sdgraph.targets.base import LowerContext
from sdgraph.targets.neural_engine import NE_OPS, neural_engine_status
from tests.targets import ne_reference

SUBS = ("text_encoder", "vae_decoder", "unet")


@pytest.fixture(scope="module")
def optimized(tiny_sd15_onnx, tmp_path_factory):
    """The tiny SD1.5 export after fold,fa,gn (canonical Attention and GroupNorm nodes)."""
    from sdgraph.passes.manager import PassManager

    out = tmp_path_factory.mktemp("ne_opt")
    for sub in SUBS:
        m = Model.load(tiny_sd15_onnx / sub / "model.onnx")
        PassManager("fold,fa,gn").run(m)
        m.save(out / sub)
    return out


@pytest.fixture(scope="module")
def lowered(optimized, tmp_path_factory):
    root = tmp_path_factory.mktemp("ne_ir")
    return {p: lower(optimized, "neural-engine", root / p, precision=p, submodels=SUBS, cache=False) and root / p
            for p in ("fp32", "bf16", "dynamic_int8")}


def _conf(path):
    return yaml.safe_load((path / "conf.yaml").read_text())["model"]["operator"]


def _types(ops) -> dict[str, int]:
    out: dict[str, int] = {}
    for op in ops.values():
        out[op["type"]] = out.get(op["type"], 0) + 1
    return out


def test_ir_structure_and_operator_mapping(optimized, lowered):
    from sdgraph.manifest import read_manifest

    man = read_manifest(lowered["fp32"])
    for sub in SUBS:
        ops = _conf(lowered["fp32"] / sub)
        types = _types(ops)
        assert set(types) <= NE_OPS and types["Input"] == 1 and types["Output"] == 1, (sub, types)
        src = Model.load(optimized / sub / "model.onnx")
        hist = src.op_histogram()
        weight_mm = sum(1 for n in src.graph.nodes if n.op in ("MatMul", "Gemm") and hasattr(n.inputs[1], "values"))
        assert types.get("InnerProduct", 0) == weight_mm, sub
        assert types.get("GroupNorm", 0) == hist.get("ai.sdgraph::GroupNorm", 0) + hist.get("ai.sdgraph::GroupNormSilu", 0)
        assert types.get("Convolution", 0) == hist.get("Conv", 0)
        # every op input is produced before it is read (graph input, weight or an earlier output)
        known = set(ops["input_data"]["output"])
        for name, op in ops.items():
            if op["type"] == "Input":
                continue
            missing = [i for i in op.get("input", {}) if i not in known]
            assert not missing, (sub, name, missing)
            known |= set(op.get("output", {}))
        # weights: locations tile model.bin exactly
        spans = sorted(tuple(s["location"]) for s in ops["input_data"]["output"].values() if "location" in s)
        assert spans[0][0] == 0 and all(a[0] + a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert spans[-1][0] + spans[-1][1] == (lowered["fp32"] / sub / "model.bin").stat().st_size
    attn = [op for op in _conf(lowered["fp32"] / "unet").values() if op["type"] == "Matmul" and "output_scale" in op.get("attr", {})]
    assert len(attn) == 8 and all(op["attr"]["src1_perm"] == "0,1,3,2" for op in attn)
    gns = [op for op in _conf(lowered["fp32"] / "vae_decoder").values() if op["type"] == "GroupNorm"]
    assert sum(op["attr"].get("append_op") == "swish" for op in gns) == 21
    assert man["submodels"]["text_encoder"]["legalize"]["dropped_outputs"] == ["pooler_output"]
    assert man["submodels"]["text_encoder"]["outputs"] == ["last_hidden_state"]


def test_fp32_ir_matches_onnx_runtime(optimized, lowered, tiny_sd15_onnx):
    """Read with the engine's operator semantics, the IR reproduces the unoptimized export (<= 1e-4 relative)."""
    for sub in SUBS:
        ref_model = Model.load(tiny_sd15_onnx / sub / "model.onnx")
        feeds = seeded_inputs(ref_model, 0)
        want = run(ref_model, feeds)
        got = ne_reference.run(lowered["fp32"] / sub, feeds)
        name = next(iter(got))
        a, b = want[name], got[name]
        assert a.shape == b.shape
        assert np.abs(a - b).max() / np.abs(a).max() <= 1e-4, sub


def test_bf16_ir_weights_and_error(optimized, lowered, tiny_sd15_onnx):
    for sub in SUBS:
        ops16 = _conf(lowered["bf16"] / sub)
        t16 = _types(ops16)
        assert t16["Quantize"] == t16.get("InnerProduct", 0) + t16.get("Convolution", 0)
        bf16_w = [s for s in ops16["input_data"]["output"].values() if s.get("dtype") == "bf16"]
        assert len(bf16_w) >= t16.get("InnerProduct", 0) + t16.get("Convolution", 0)
        if sub != "text_encoder":  # (the text encoder's bytes are mostly its fp32 token-embedding table)
            assert (lowered["bf16"] / sub / "model.bin").stat().st_size < 0.75 * (lowered["fp32"] / sub / "model.bin").stat().st_size
        ref_model = Model.load(tiny_sd15_onnx / sub / "model.onnx")
        feeds = seeded_inputs(ref_model, 0)
        want = run(ref_model, feeds)
        got = ne_reference.run(lowered["bf16"] / sub, feeds)
        name = next(iter(got))
        rep = compare({name: want[name]}, {name: got[name]})[name]
        assert rep["max_rel"] <= 0.05 and rep["cosine"] >= 0.999, (sub, rep)


def test_dynamic_int8_ir_form_and_error(lowered, tiny_sd15_onnx):
    """The engine's dynamic quantization: s8 weights per output channel, a run-time Quantize (s8 per token
    before InnerProduct, u8 per tensor before Convolution) with its min/scale outputs fed to the op."""
    for sub in SUBS:
        ops = _conf(lowered["dynamic_int8"] / sub)
        consts = ops["input_data"]["output"]
        t = _types(ops)
        int8_ops = [(n, op) for n, op in ops.items() if op["type"] in ("InnerProduct", "Convolution")
                    and consts.get(list(op["input"])[1], {}).get("dtype") == "s8"]
        quants = {n: op for n, op in ops.items() if op["type"] == "Quantize"}
        assert int8_ops and len(quants) == len(int8_ops)
        assert t.get("InnerProduct", 0) + t.get("Convolution", 0) >= len(int8_ops)
        producers = {o: n for n, op in ops.items() for o in op.get("output", {})}
        for _name, op in int8_ops:
            ins = list(op["input"])
            q = quants[producers[ins[0]]]
            assert list(q["output"]) == [ins[0], ins[-4], ins[-3]]  # data, min, scale of the activation
            want = ("s8", True) if op["type"] == "InnerProduct" else ("u8", False)
            assert (q["attr"]["output_dtype"], q["attr"]["per_token"]) == want
            w, wscale = consts[ins[1]], consts[ins[-1]]
            # output channels: Convolution [O,C,kh,kw]; InnerProduct [K,N] (src1_perm 1,0) or [N,K] (0,1)
            channels = w["shape"][0] if op["type"] == "Convolution" or op["attr"]["src1_perm"] == "0,1" else w["shape"][1]
            assert wscale["shape"][0] == channels and wscale["dtype"] == "fp32"
        if sub != "text_encoder":
            assert (lowered["dynamic_int8"] / sub / "model.bin").stat().st_size < \
                0.4 * (lowered["fp32"] / sub / "model.bin").stat().st_size
        ref_model = Model.load(tiny_sd15_onnx / sub / "model.onnx")
        feeds = seeded_inputs(ref_model, 0)
        want = run(ref_model, feeds)
        got = ne_reference.run(lowered["dynamic_int8"] / sub, feeds)
        name = next(iter(got))
        rep = compare({name: want[name]}, {name: got[name]})[name]
        assert 0 < rep["max_rel"] <= 0.15 and rep["cosine"] >= 0.99, (sub, rep)


def test_dynamic_int8_keeps_inner_products_the_engine_refuses_in_fp32(lowered):
    """The tiny text encoder's MLP has K = 37: the engine's s8 kernel needs K % 4 == 0 ("k must pad with 4")."""
    ops = _conf(lowered["dynamic_int8"] / "text_encoder")
    consts = ops["input_data"]["output"]
    kept = [op for op in ops.values() if op["type"] == "InnerProduct" and consts[list(op["input"])[1]]["dtype"] == "fp32"]
    assert kept and all(consts[list(op["input"])[1]]["shape"][0] % 4 for op in kept)


def test_vae_encoder_pad_folds_into_convolution(tiny_sd15_onnx, tmp_path):
    """The VAE encoder's downsampling Pad (right/bottom by 1) has no engine op: it becomes the stride-2
    Convolution's pads, written in the engine's (begin, end) per axis order."""
    src = tiny_sd15_onnx / "vae_encoder" / "model.onnx"
    n_pads = sum(1 for n in Model.load(src).graph.nodes if n.op == "Pad")
    assert n_pads == 3
    lower(tiny_sd15_onnx, "neural-engine", tmp_path / "enc", submodels=["vae_encoder"], cache=False)
    ops = _conf(tmp_path / "enc" / "vae_encoder")
    padded = [op for op in ops.values() if op["type"] == "Convolution" and op["attr"]["pads"] == "0,1,0,1"]
    assert len(padded) == n_pads and all(op["attr"]["strides"] == "2,2" for op in padded)
    feeds = seeded_inputs(Model.load(src), 3)
    want = run(Model.load(src), feeds)
    got = ne_reference.run(tmp_path / "enc" / "vae_encoder", feeds)
    name = next(iter(got))
    assert np.abs(want[name] - got[name]).max() / np.abs(want[name]).max() <= 1e-4
    if _NE_OK:  # the real engine takes the same form
        real = load_artifact(tmp_path / "enc").runner("vae_encoder")(feeds)[name]
        assert np.abs(want[name] - real).max() / np.abs(want[name]).max() <= 5e-3


def test_doctor_and_run_give_the_same_reason(lowered, tmp_path, monkeypatch):
    """One probe (the worker, started as run starts it) and one wording for doctor, targets and run."""
    from typer.testing import CliRunner

    from sdgraph.cli import app
    from sdgraph.doctor import checks
    from sdgraph.targets import neural_engine

    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nkill -ILL $$\n")
    fake.chmod(0o755)
    monkeypatch.setenv("SDGRAPH_NE_PYTHON", str(fake))
    neural_engine._status.cache_clear()
    try:
        rows = {name: (ok, why) for name, ok, why in checks()}
        ok, why = rows["Neural Engine runtime env"]
        assert not ok and "SIGILL" in why
        assert rows["target neural-engine"][1].endswith(why)
        res = CliRunner().invoke(app, ["run", str(lowered["fp32"]), "-p", "a cat", "--steps", "1", "-o",
                                       str(tmp_path / "x.png")])
        assert res.exit_code == 3 and res.output.strip().splitlines()[-1] == f"error: Neural Engine runtime unavailable: {why}"
    finally:
        neural_engine._status.cache_clear()


def _lower_text(tmp_path, text, shapes):
    src = tmp_path / "m.onnx"
    Model.from_onnx_text(text).save(src)
    lower(src, "neural-engine", tmp_path / "out", shapes=[shapes], cache=False)
    return _conf(tmp_path / "out" / "model")


def test_engine_forms_found_on_the_real_runtime(tmp_path):
    """Forms the real 1.4.2 runtime needs (each was a crash or a wrong number there before)."""
    ops = _lower_text(tmp_path, """
    <ir_version: 8, opset_import: ["" : 17]>
    g (int64[1,6] ids, float[1,6,16] x, float[16] t) => (float[1,6,16] y, float[1,6,16] s) {
      table = Constant<value = float[10,16] {""" + ",".join(["0.1"] * 160) + """}>()
      e = Gather<axis=0>(table, ids)
      r2 = Constant<value = float[1] {1.4142135}>()
      one = Constant<value = float[1] {1.0}>()
      half = Constant<value = float[1] {0.5}>()
      d = Div(x, r2)
      f = Erf(d)
      a = Add(f, one)
      m = Mul(x, a)
      g1 = Mul(m, half)
      b = Add(g1, t)
      y = Add(b, e)
      s = Sin(y)
    }""", {"ids": (1, 6), "x": (1, 6, 16), "t": (16,)})
    by_type = {}
    for op in ops.values():
        by_type.setdefault(op["type"], []).append(op)
    # Gather: index axis last (1 for [1,6] ids), source axis in batch_dims
    assert by_type["Gather"][0]["attr"] == {"axis": 1, "batch_dims": 0}
    # the GELU chain is one engine Erf (which computes GELU); no BinaryOp is left of it
    assert len(by_type["Erf"]) == 1 and not any(op["attr"]["algorithm"] == "div" for op in by_type.get("BinaryOp", []))
    # broadcast Add -> BinaryOp add; equal shapes -> BinaryAdd
    assert [op["attr"] for op in by_type["BinaryOp"]] == [{"algorithm": "add"}]
    assert len(by_type["BinaryAdd"]) == 1
    assert by_type["CosSin"][0]["attr"] == {"algorithm": "sin", "output_dtype": "fp32"}


def test_bare_erf_and_odd_sized_sin_are_refused(tmp_path):
    from sdgraph.errors import UnsupportedError

    with pytest.raises(UnsupportedError) as exc:
        _lower_text(tmp_path, """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1,3,5] x) => (float[1,3,5] y, float[1,3,5] z) {
          y = Erf(x)
          z = Cos(x)
        }""", {"x": (1, 3, 5)})
    text = " ".join(exc.value.problems)
    assert "computes GELU(x), not erf(x)" in text and "multiple of 8" in text


def test_check_names_what_the_engine_lacks():
    m = Model.from_onnx_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,4] x) => (float[1,4] y) {
      w = Constant<value = float[4,4] {1,0,0,0, 0,1,0,0, 0,0,1,0, 0,0,0,1}>()
      h = MatMul(x, w)
      y = Relu(h)
    }""")
    tgt = get_target("neural-engine")
    probs = tgt.check(m, LowerContext(options=tgt.parse_options({}), role="unet"))
    assert [p.op for p in probs] == ["Relu"] and "no Neural Engine operator for Relu" in probs[0].reason


def test_dynamic_input_needs_shape_and_static_int8_is_refused(tmp_path):
    from sdgraph.errors import UnsupportedError

    src = tmp_path / "m.onnx"
    Model.from_onnx_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,4] x) => (float[N,4] y) {
      y = Sigmoid(x)
    }""").save(src)
    with pytest.raises(UnsupportedError, match="--shape x="):
        lower(src, "neural-engine", tmp_path / "out")
    with pytest.raises(UsageError, match="takes fp32, bf16, dynamic_int8"):
        lower(src, "neural-engine", tmp_path / "out", precision="int8", shapes=[{"x": (2, 4)}])
    lower(src, "neural-engine", tmp_path / "ok", shapes=[{"x": (2, 4)}], cache=False)
    ops = _conf(tmp_path / "ok" / "model")
    assert _types(ops) == {"Input": 1, "Sigmoid": 1, "Output": 1}
    assert ops["input_data"]["output"]["x"] == {"dtype": "fp32", "shape": [-1, 4]}


def test_status_without_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SDGRAPH_NE_PYTHON", str(tmp_path / "nope" / "python"))
    ok, why = neural_engine_status()
    assert not ok and "tools/setup_neural_engine.sh" in why


# -- the runtime: only where the engine's environment exists and its library loads on this CPU -----
_NE_OK, _NE_WHY = neural_engine_status()
needs_runtime = pytest.mark.skipif(not _NE_OK, reason=f"Neural Engine runtime not usable here: {_NE_WHY}")
@needs_runtime
@pytest.mark.parametrize("precision", ["fp32", "bf16", "dynamic_int8"])
@pytest.mark.parametrize("sub", SUBS)
def test_runtime_matches_onnx_runtime(lowered, tiny_sd15_onnx, sub, precision):
    """The real engine (where its library loads: AVX-512 CPUs) runs the emitted IR; numbers vs ONNX Runtime."""
    art = load_artifact(lowered[precision])
    runner = art.runner(sub)
    ref_model = Model.load(tiny_sd15_onnx / sub / "model.onnx")
    feeds = seeded_inputs(ref_model, 0)
    want = run(ref_model, feeds)
    got = runner(feeds)
    name = next(iter(got))
    a, b = want[name].ravel().astype(np.float64), got[name].ravel().astype(np.float64)
    rel, cos = np.abs(a - b).max() / np.abs(a).max(), a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    print(f"neural engine {sub} {precision}: max rel {rel:.2e}, cosine {cos:.7f}")
    # the engine's own kernels, not ONNX Runtime's (README: measured per submodel and precision)
    assert rel <= {"fp32": 5e-3, "bf16": 5e-2, "dynamic_int8": 0.15}[precision]
    assert cos >= {"fp32": 0.99999, "bf16": 0.999, "dynamic_int8": 0.99}[precision]


def test_raw_export_gets_groupnorm_without_passes(tiny_sd15_onnx, tmp_path):
    """Straight from the exporter: shapes fold, the GroupNorm pattern becomes the engine's GroupNorm."""
    lower(tiny_sd15_onnx, "neural-engine", tmp_path / "raw", submodels=["vae_decoder"], cache=False)
    types = _types(_conf(tmp_path / "raw" / "vae_decoder"))
    assert types["GroupNorm"] == 22 and "InstanceNormalization" not in types
    feeds = seeded_inputs(Model.load(tiny_sd15_onnx / "vae_decoder" / "model.onnx"), 1)
    want = run(Model.load(tiny_sd15_onnx / "vae_decoder" / "model.onnx"), feeds)["sample"]
    got = ne_reference.run(tmp_path / "raw" / "vae_decoder", feeds)["sample"]
    assert np.abs(want - got).max() / np.abs(want).max() <= 1e-4


# -- the runner/worker plumbing, with a stand-in runtime that executes the IR with ne_reference ------
_FAKE_NE = '''
import yaml
from pathlib import Path
from tests.targets import ne_reference


class Model:
    def __init__(self, conf, weights):
        self.dir = Path(conf).parent
        ops = yaml.safe_load(Path(conf).read_text())["model"]["operator"]
        self.names = [n for n, s in ops["input_data"]["output"].items() if "location" not in s]

    def forward(self, inputs):
        if len(inputs) != len(self.names):
            raise ValueError(f"expected {len(self.names)} inputs, got {len(inputs)}")
        return list(ne_reference.run(self.dir, dict(zip(self.names, inputs))).values())
'''


@pytest.fixture
def fake_runtime(tmp_path, monkeypatch):
    import sys

    from sdgraph.targets import neural_engine

    pkg = tmp_path / "fake" / "intel_extension_for_transformers"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "neural_engine_py.py").write_text(_FAKE_NE)
    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'fake'}:{root}")
    monkeypatch.setenv("SDGRAPH_NE_PYTHON", sys.executable)
    neural_engine._status.cache_clear()
    yield
    neural_engine._status.cache_clear()


@pytest.mark.slow  # a worker process serving the reference reader
def test_runner_drives_a_served_worker(fake_runtime, lowered, tiny_sd15_onnx):
    from sdgraph.errors import PassError

    assert neural_engine_status()[0]
    art = load_artifact(lowered["fp32"])
    runner = art.runner("vae_decoder")
    ref_model = Model.load(tiny_sd15_onnx / "vae_decoder" / "model.onnx")
    feeds = seeded_inputs(ref_model, 2)
    want = run(ref_model, feeds)["sample"]
    got = runner(feeds)["sample"]
    assert np.abs(want - got).max() / np.abs(want).max() <= 1e-4
    ne_runner = getattr(runner, "inner", runner)  # the driver's shape guard wraps the target's runner
    pid = ne_runner._proc.pid
    outs, times = ne_runner.run(feeds, warmup=1, iters=2)
    assert len(times) == 2 and ne_runner._proc.pid == pid  # the model stays loaded between calls
    ne_runner.input_names = []  # a request the engine refuses: one error line, the worker keeps serving
    with pytest.raises(PassError, match="expected 1 inputs, got 0"):
        ne_runner.run(feeds)
    assert ne_runner._proc.poll() is None
    ne_runner.close()


def test_gelu_fusion_shares_the_geglu_matcher():
    """The engine's Gelu fusion takes the erf chains the geglu pass matches (any Mul order, 0.5·x first),
    and leaves one whose inner product is also a graph output."""
    from sdgraph.targets.neural_engine import _fuse_gelu

    m = Model.from_onnx_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,8] x) => (float[2,8] a, float[2,8] b, float[2,8] c, float[2,8] d, float[2,8] dp) {
      r2 = Constant<value = float[1] {1.4142135}>()
      ir2 = Constant<value = float[1] {0.70710677}>()
      one = Constant<value = float[1] {1.0}>()
      half = Constant<value = float[1] {0.5}>()
      a1 = Div(x, r2)
      a2 = Erf(a1)
      a3 = Add(a2, one)
      a4 = Mul(x, a3)
      a = Mul(a4, half)
      b1 = Mul(x, ir2)
      b2 = Erf(b1)
      b3 = Add(one, b2)
      b4 = Mul(b3, half)
      b = Mul(b4, x)
      hx = Mul(x, half)
      c1 = Div(x, r2)
      c2 = Erf(c1)
      c3 = Add(c2, one)
      c = Mul(hx, c3)
      d1 = Div(x, r2)
      d2 = Erf(d1)
      d3 = Add(d2, one)
      dp = Mul(x, d3)
      d = Mul(dp, half)
    }""")
    assert _fuse_gelu(m) == 3
    gelus = [n for n in m.graph.nodes if n.op == "Gelu"]
    assert sorted(n.outputs[0].name for n in gelus) == ["a", "b", "c"]
    assert all(n.inputs[0].name == "x" for n in gelus)
    assert sum(n.op == "Erf" for n in m.graph.nodes) == 1  # d's chain stays: its product dp is an output
