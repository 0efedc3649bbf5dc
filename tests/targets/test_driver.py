"""The lowering driver: check-all-first, cache hit/miss with reasons, shape buckets, artifact loading, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from sdgraph.cli import app
from sdgraph.errors import InputError, TargetUnavailable, UnsupportedError, UsageError
from sdgraph.ir.model import Model
from sdgraph.manifest import read_manifest, write_manifest
from sdgraph.targets import load_artifact, lower
from sdgraph.targets.driver import parse_shape_args, parse_shape_spec

MLP = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x) => (float[N,4] y) {
  w = Constant <value = float[4,4] {1,0,0,0, 0,2,0,0, 0,0,3,0, 0,0,0,4}> ()
  a = MatMul(x, w)
  y = Relu(a)
}"""


def _write(tmp_path, text=MLP, name="m"):
    d = tmp_path / name
    Model.from_onnx_text(text).save(d)
    return d


def _bad_ops_model(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    nodes = [helper.make_node("Frob", ["x"], ["a"], name="frob_1", domain="com.example"),
             helper.make_node("Relu", ["a"], ["b"], name="relu"),
             helper.make_node("Frob", ["b"], ["y"], name="frob_2", domain="com.example")]
    proto = helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    proto.ir_version = 8
    d = tmp_path / "bad"
    Model.from_proto(proto).save(d)
    return d


# -- cache ----------------------------------------------------------------------------------------
def test_second_lower_hits_cache_and_says_so(tmp_path):
    src = _write(tmp_path)
    cache = tmp_path / "cache"
    r1 = lower(src, "ort", tmp_path / "a1", cache_dir=cache)
    assert r1.submodels["model"]["cache"] == "miss"
    assert "no earlier build" in r1.submodels["model"]["reason"]
    r2 = lower(src, "ort", tmp_path / "a2", cache_dir=cache)
    assert r2.submodels["model"]["cache"] == "hit" and r2.cache_line("model") == "cache hit"
    assert r2.manifest["submodels"]["model"]["files"] == r1.manifest["submodels"]["model"]["files"]
    out = load_artifact(tmp_path / "a2").runner()({"x": np.ones((2, 4), np.float32)})
    np.testing.assert_allclose(out["y"], [[1, 2, 3, 4]] * 2)


def test_changed_pipeline_misses_and_says_why(tmp_path):
    src = _write(tmp_path)
    write_manifest(src, {"kind": "model", "passes": [{"pipeline": "fold"}]})
    cache = tmp_path / "cache"
    lower(src, "ort", tmp_path / "a1", cache_dir=cache)
    m = read_manifest(src)
    m["passes"] = [{"pipeline": "fold,fa"}]
    write_manifest(src, m)
    r = lower(src, "ort", tmp_path / "a2", cache_dir=cache)
    assert r.submodels["model"]["cache"] == "miss"
    assert r.submodels["model"]["reason"] == "pipeline changed (fold -> fold,fa)"


@pytest.mark.parametrize("change, expect", [
    ({"options": {"threads": "1"}}, "options changed (threads 0 -> 1)"),
    ({"precision": "int8"}, None),  # int8 needs a QDQ graph: refused before any work
    ({"shapes": [{"x": (3, 4)}]}, "shapes changed"),
])
def test_miss_reasons(tmp_path, change, expect):
    src = _write(tmp_path)
    cache = tmp_path / "cache"
    lower(src, "ort", tmp_path / "a1", cache_dir=cache)
    if expect is None:
        with pytest.raises(UnsupportedError, match="QDQ"):
            lower(src, "ort", tmp_path / "a2", cache_dir=cache, **change)
        assert not (tmp_path / "a2").exists()
        return
    r = lower(src, "ort", tmp_path / "a2", cache_dir=cache, **change)
    assert r.submodels["model"]["cache"] == "miss" and r.submodels["model"]["reason"].startswith(expect)


def test_changed_graph_misses(tmp_path):
    src = _write(tmp_path)
    cache = tmp_path / "cache"
    lower(src, "ort", tmp_path / "a1", cache_dir=cache)
    Model.from_onnx_text(MLP.replace("Relu", "Sigmoid")).save(src, force=True)  # replace the input on purpose
    r = lower(src, "ort", tmp_path / "a2", cache_dir=cache)
    assert r.submodels["model"]["reason"].startswith("graph changed (hash ")


def test_no_cache_builds(tmp_path):
    src = _write(tmp_path)
    r = lower(src, "ort", tmp_path / "a1", cache=False, cache_dir=tmp_path / "c")
    assert r.submodels["model"]["cache"] == "off" and not (tmp_path / "c" / "ort").exists()


# -- check before any work -----------------------------------------------------------------------
@pytest.mark.parametrize("target", ["ort", "openvino", "torch"])
def test_unsupported_ops_listed_per_node_before_any_work(tmp_path, target):
    if target == "openvino":
        pytest.importorskip("openvino")
    src = _bad_ops_model(tmp_path)
    with pytest.raises(UnsupportedError) as ei:
        lower(src, target, tmp_path / "out", cache_dir=tmp_path / "c")
    probs = ei.value.problems
    assert len(probs) == 2, probs
    assert probs[0].startswith("frob_1 (com.example::Frob)") and probs[1].startswith("frob_2 (com.example::Frob)")
    assert ei.value.exit_code == 4
    assert not (tmp_path / "out").exists() and not (tmp_path / "c").exists()


def test_torch_lists_op_without_mapping(tmp_path):
    text = MLP.replace("y = Relu(a)", "y = Hardmax(a)")
    with pytest.raises(UnsupportedError) as ei:
        lower(_write(tmp_path, text), "torch", tmp_path / "o", cache=False)
    assert len(ei.value.problems) == 1 and "(Hardmax): no torch converter" in ei.value.problems[0]


def test_unknown_target_option_precision(tmp_path):
    src = _write(tmp_path)
    with pytest.raises(UsageError, match="unknown target 'tensorrt'"):
        lower(src, "tensorrt", tmp_path / "o")
    with pytest.raises(UsageError, match="has no option 'bogus'"):
        lower(src, "ort", tmp_path / "o", options={"bogus": 1})
    with pytest.raises(UsageError, match="does not take precision 'bf16'"):
        lower(src, "ort", tmp_path / "o", precision="bf16")
    with pytest.raises(UsageError, match="cudagraphs needs device=cuda"):
        lower(src, "torch", tmp_path / "o", options={"mode": "cudagraphs"})


def test_target_not_installed_names_the_extra(tmp_path, monkeypatch):
    from sdgraph.targets.openvino import OpenVinoTarget

    monkeypatch.setattr(OpenVinoTarget, "available", lambda self: (False, "openvino is not installed"))
    with pytest.raises(TargetUnavailable, match=r"pip install 'sdgraph\[openvino\]'"):
        lower(_write(tmp_path), "openvino", tmp_path / "o")


def test_output_over_input_refused(tmp_path):
    src = _write(tmp_path)
    with pytest.raises(InputError, match="would overwrite the input"):
        lower(src, "ort", src)


# -- shapes ---------------------------------------------------------------------------------------
def test_shape_text():
    assert parse_shape_spec("sample=2x4x64x64;t=1") == {"sample": (2, 4, 64, 64), "t": (1,)}
    assert parse_shape_args(["s=1x4x64x64", "e=1x77x768", "s=1x4x96x96"]) == [
        {"s": (1, 4, 64, 64), "e": (1, 77, 768)}, {"s": (1, 4, 96, 96), "e": (1, 77, 768)}]
    for bad in ("sample", "sample=2xfoo", "sample=0x4", "="):
        with pytest.raises(UsageError):
            parse_shape_spec(bad)


def test_shape_must_name_an_input_with_its_rank(tmp_path):
    src = _write(tmp_path)
    with pytest.raises(UsageError, match="unknown input"):
        lower(src, "ort", tmp_path / "o", shapes=[{"z": (1, 4)}])
    with pytest.raises(UsageError, match="rank 2, not 3"):
        lower(src, "ort", tmp_path / "o", shapes=[{"x": (1, 4, 1)}])
    with pytest.raises(UsageError, match="dim 1 fixed to 4"):
        lower(src, "ort", tmp_path / "o", shapes=[{"x": (1, 5)}])


def test_undeclared_shape_runs_dynamically_or_fails_naming_buckets(tmp_path):
    src = _write(tmp_path)
    lower(src, "ort", tmp_path / "a", shapes=[{"x": (2, 4)}, {"x": (8, 4)}], cache=False)
    art = load_artifact(tmp_path / "a")
    assert art.manifest["shapes"] == [{"x": [2, 4]}, {"x": [8, 4]}]
    assert art.runner()({"x": np.ones((3, 4), np.float32)})["y"].shape == (3, 4)  # ort: dynamic
    strict = load_artifact(tmp_path / "a", strict_shapes=True)
    with pytest.raises(InputError, match=r"x=3x4 match no declared shape bucket \(declared: x=2x4 \| x=8x4\)"):
        strict.runner()({"x": np.ones((3, 4), np.float32)})
    assert strict.runner()({"x": np.ones((8, 4), np.float32)})["y"].shape == (8, 4)


def test_openvino_compiles_per_bucket_and_refuses_others(tmp_path):
    pytest.importorskip("openvino")
    src = _write(tmp_path)
    lower(src, "openvino", tmp_path / "a", shapes=[{"x": (2, 4)}, {"x": (5, 4)}], cache=False)
    entry = read_manifest(tmp_path / "a")["submodels"]["model"]
    assert entry["blobs"] == ["model.0.blob", "model.1.blob"] and entry["dynamic"] is False
    assert entry["config"]["INFERENCE_PRECISION_HINT"] == "f32"
    run = load_artifact(tmp_path / "a").runner()
    np.testing.assert_allclose(run({"x": np.ones((5, 4), np.float32)})["y"], [[1, 2, 3, 4]] * 5)
    with pytest.raises(InputError, match="declared: x=2x4 | x=5x4"):
        run({"x": np.ones((3, 4), np.float32)})


# -- loading --------------------------------------------------------------------------------------
def test_corrupted_or_foreign_artifacts_fail_in_one_line(tmp_path):
    src = _write(tmp_path)
    art = tmp_path / "a"
    lower(src, "ort", art, cache=False)
    with pytest.raises(InputError, match="artifact is for target 'ort', not 'openvino'"):
        load_artifact(art, target="openvino")
    (art / "model" / "model.opt.onnx").write_bytes(b"garbage")
    with pytest.raises(InputError, match=r"corrupted artifact \(model/model.opt.onnx is 7 bytes"):
        load_artifact(art)
    (art / "model" / "model.opt.onnx").unlink()
    with pytest.raises(InputError, match=r"corrupted artifact \(model/model.opt.onnx is missing\)"):
        load_artifact(art)
    m = read_manifest(art)
    m["sdgraph_version"] = "0.0.1"
    write_manifest(art, m)
    with pytest.raises(InputError, match="built by sdgraph 0.0.1"):
        load_artifact(art)
    (art / "sdgraph.json").write_text("{not json")
    with pytest.raises(InputError, match="unreadable manifest"):
        load_artifact(art)
    with pytest.raises(InputError, match="no sdgraph.json"):
        load_artifact(src)
    with pytest.raises(InputError, match="not an artifact directory"):
        load_artifact(tmp_path / "nope")


@pytest.mark.slow  # an inductor compile: about 20 s of CPU
def test_torch_compile_default_mode_runs(tmp_path):
    """torch.compile (inductor) on a small graph, warmed at lowering for the declared bucket."""
    from sdgraph import progress

    src = _write(tmp_path)
    rec = progress.Recorder()
    with progress.using(rec):
        r = lower(src, "torch", tmp_path / "a", shapes=[{"x": (2, 4)}], options={"mode": "default"}, cache=False)
    assert [(t.description, t.total, t.advances) for t in rec.tasks] == [("lower torch", 1, 1), ("torch.compile model", 1, 1)]
    entry = r.manifest["submodels"]["model"]
    assert len(entry["warmup_compile_s"]) == 1 and entry["settings"]["mode"] == "default"
    out = load_artifact(tmp_path / "a").runner()({"x": np.full((2, 4), -1.0, np.float32) + 2})
    np.testing.assert_allclose(out["y"], [[1, 2, 3, 4]] * 2)


# -- CLI ------------------------------------------------------------------------------------------
def test_cli_lower_and_targets(tmp_path, monkeypatch):
    monkeypatch.setenv("SDGRAPH_CACHE_DIR", str(tmp_path / "cache"))
    src = _write(tmp_path)
    runner = CliRunner()
    r = runner.invoke(app, ["targets"])
    assert r.exit_code == 0 and all(t in r.output for t in ("ort", "openvino", "torch"))
    r = runner.invoke(app, ["lower", str(src), "-t", "ort", "-o", str(tmp_path / "a"), "--shape", "x=2x4", "--option", "threads=1"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "a" / "sdgraph.json").read_text())["options"]["threads"] == 1
    r = runner.invoke(app, ["lower", str(src), "-t", "ort", "-o", str(tmp_path / "b"), "--shape", "x=2x4", "--option", "threads=1"])
    assert r.exit_code == 0 and "cache hit" in r.output
    r = runner.invoke(app, ["lower", str(src), "-t", "nope", "-o", str(tmp_path / "c")])
    assert r.exit_code == 2 and "unknown target 'nope'" in r.output
    r = runner.invoke(app, ["lower", str(_bad_ops_model(tmp_path)), "-t", "ort", "-o", str(tmp_path / "c")])
    assert r.exit_code == 4 and "frob_1 (com.example::Frob)" in r.output and "frob_2" in r.output
    r = runner.invoke(app, ["lower", str(src), "-t", "ort", "-o", str(tmp_path / "c"), "--option", "threads"])
    assert r.exit_code == 2 and "expected KEY=VALUE" in r.output


# -- cache bound -----------------------------------------------------------------------------------
def test_cache_evicts_least_recently_used_beyond_its_bound(tmp_path, monkeypatch):
    import os
    import time

    from sdgraph.targets.cache import ArtifactCache

    cache = tmp_path / "cache"
    a = _write(tmp_path, name="a")
    b = _write(tmp_path, MLP.replace("Relu", "Sigmoid"), name="b")
    c = _write(tmp_path, MLP.replace("Relu", "Tanh"), name="c")
    lower(a, "ort", tmp_path / "oa", cache_dir=cache)
    lower(b, "ort", tmp_path / "ob", cache_dir=cache)
    entries = ArtifactCache(cache).entries()
    assert len(entries) == 2
    one = max(n for _, _, n in entries)
    # a is used again (a hit), so b is now the least recently used
    for i, (folder, _, _) in enumerate(entries):
        os.utime(folder / "entry.json", (time.time() - 100 + i, time.time() - 100 + i))
    assert lower(a, "ort", tmp_path / "oa2", cache_dir=cache).submodels["model"]["cache"] == "hit"
    monkeypatch.setenv("SDGRAPH_CACHE_MAX_GB", str(2.5 * one / 1e9))  # room for two entries, not three
    lower(c, "ort", tmp_path / "oc", cache_dir=cache)
    left = ArtifactCache(cache).entries()
    assert len(left) == 2
    assert lower(b, "ort", tmp_path / "ob2", cache_dir=cache).submodels["model"]["cache"] == "miss"  # b evicted
    assert (tmp_path / "ob" / "model" / "model.onnx").is_file()  # artifacts keep their (hard-linked) files


def test_cache_unbounded_and_bad_bound(monkeypatch):
    from sdgraph.targets.cache import DEFAULT_MAX_GB, cache_max_bytes

    monkeypatch.setenv("SDGRAPH_CACHE_MAX_GB", "0")
    assert cache_max_bytes() is None
    for bad in ("lots", "inf", "nan", "-3"):  # a bound that is no size is bad input, not a silent default
        monkeypatch.setenv("SDGRAPH_CACHE_MAX_GB", bad)
        with pytest.raises(UsageError, match="SDGRAPH_CACHE_MAX_GB"):
            cache_max_bytes()
    monkeypatch.delenv("SDGRAPH_CACHE_MAX_GB")
    assert cache_max_bytes() == int(DEFAULT_MAX_GB * 1e9)


def test_cache_command_lists_prunes_and_clears(tmp_path):
    cache = tmp_path / "cache"
    lower(_write(tmp_path, name="a"), "ort", tmp_path / "oa", cache_dir=cache)
    lower(_write(tmp_path, MLP.replace("Relu", "Sigmoid"), name="b"), "ort", tmp_path / "ob", cache_dir=cache)
    runner = CliRunner()
    def words(r) -> str:  # the console wraps at 80 columns, where depends on the temp path's length
        return " ".join(r.output.split())

    r = runner.invoke(app, ["cache", "--cache-dir", str(cache)])
    assert r.exit_code == 0 and "2 entries" in words(r) and r.output.count("ort ") == 2
    r = runner.invoke(app, ["cache", "--cache-dir", str(cache), "--prune", "0"])
    assert r.exit_code == 0 and "evicted 2 entries" in words(r) and "0 entries" in words(r)
    lower(_write(tmp_path, name="c"), "ort", tmp_path / "oc", cache_dir=cache)
    r = runner.invoke(app, ["cache", "--cache-dir", str(cache), "--clear"])
    assert r.exit_code == 0 and "removed 1 entries" in words(r)
    assert not (cache / "hashes").exists()
    r = runner.invoke(app, ["cache", "--cache-dir", str(cache), "--prune", "-1"])
    assert r.exit_code != 0 and "--prune -1.0: must be in" in r.output and "Traceback" not in r.output


def test_ort_refuses_a_bf16_cast_graph_as_unsupported(tmp_path):
    """ORT's CPU provider cannot load bfloat16 casts between ops: exit 4 before any work, not a load error."""
    text = MLP.replace("y = Relu(a)", "b = Cast <to = 16> (a)\n  c = Relu(b)\n  y = Cast <to = 1> (c)")
    src = _write(tmp_path, text)
    with pytest.raises(UnsupportedError) as ei:
        lower(src, "ort", tmp_path / "out", cache_dir=tmp_path / "c")
    assert ei.value.exit_code == 4 and "1 casts to bfloat16" in ei.value.problems[0]
    assert not (tmp_path / "out").exists()
