"""The CLI on bad input: one line on stderr, a documented non-zero exit, no traceback, input intact."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from sdgraph.ir import runtime
from sdgraph.ir.model import Model
from tests.graphs import mlp_model, save_external


def sdgraph(*args, cwd=None):
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "sdgraph", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env)


def _digest(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture()
def model_file(tmp_path):
    return save_external(mlp_model(hidden=256), tmp_path / "m" / "model.onnx")


def _assert_one_line_error(res, code, match):
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") and match in lines[0], lines[0]
    assert "Traceback" not in res.stderr + res.stdout


def test_optimize_happy_path_prints_table_and_writes_report(model_file, tmp_path):
    before = _digest(model_file.parent)
    res = sdgraph("optimize", model_file, "--passes", " fold , cse,cleanup ", "-o", tmp_path / "out",
                  "--verify", "--report", tmp_path / "r.json", "--dump-dir", tmp_path / "dump")
    assert res.returncode == 0, res.stderr
    assert "fold,cse,fold,cse" in res.stdout and "op counts" in res.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    (rep,) = report.values()
    assert rep["pipeline"] == "fold,cse,fold,cse"
    assert [r["spec"] for r in rep["records"]] == ["fold", "cse", "fold", "cse"]
    assert rep["numbers"] is None or rep["numbers"]["max_rel"] == 0.0
    assert (tmp_path / "dump" / "004_cse.onnx").is_file()
    assert _digest(model_file.parent) == before
    np.testing.assert_array_equal(runtime.run(Model.load(tmp_path / "out"), seed=3)["y"],
                                  runtime.run(Model.load(model_file), seed=3)["y"])


def test_inspect_and_passes_and_doctor(model_file):
    res = sdgraph("inspect", model_file, "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["parameters"] == 16 * 256 * 2 + 2 and info["ops"] == {"MatMul": 2, "Relu": 1, "Reshape": 1}
    res = sdgraph("passes")
    assert res.returncode == 0 and "fold" in res.stdout and "max_growth" in res.stdout and "sd-unet" in res.stdout
    res = sdgraph("doctor")
    assert res.returncode == 0 and "onnxruntime" not in res.stderr and "target" in res.stdout


def _truncated(tmp_path):
    p = tmp_path / "t.onnx"
    onnx.save(mlp_model(), str(p))
    p.write_bytes(p.read_bytes()[:50])
    return p


def _outside(tmp_path):
    p = save_external(mlp_model(hidden=256), tmp_path / "o" / "model.onnx")
    proto = onnx.load(str(p), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../../secret.bin"
    onnx.save(proto, str(p))
    return p


def _missing_data(tmp_path):
    p = save_external(mlp_model(hidden=256), tmp_path / "md" / "model.onnx")
    (p.parent / "model.onnx_data").unlink()
    return p


def _not_onnx(tmp_path):
    p = tmp_path / "x.onnx"
    p.write_text("this is a text file, not a protobuf\n" * 5)
    return p


def _empty_graph(tmp_path):
    p = tmp_path / "e.onnx"
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "e", [], [])), str(p))
    return p


@pytest.mark.parametrize("make,match", [
    (_not_onnx, "cannot be parsed as ONNX"),
    (_truncated, "cannot be parsed as ONNX"),
    (_missing_data, "is missing"),
    (_outside, "outside the model's folder"),
    (_empty_graph, "graph is empty"),
])
def test_bad_model_files(tmp_path, make, match):
    path = make(tmp_path)
    before = _digest(path.parent)
    res = sdgraph("optimize", path, "--passes", "fold", "-o", tmp_path / "out")
    _assert_one_line_error(res, 2, match)
    assert _digest(path.parent) == before
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spec,match", [
    ("fold,nosuch", "unknown pass 'nosuch'"),
    ("fold{max_growth=abc}", "bad value 'abc'"),
    ("tome:abc", "bad value 'abc' for option"),
    ("fold{max_growth=1", "unbalanced"),
])
def test_bad_pipelines(model_file, tmp_path, spec, match):
    res = sdgraph("optimize", model_file, "--passes", spec, "-o", tmp_path / "out")
    _assert_one_line_error(res, 2, match)


def test_output_equal_to_input(model_file):
    before = _digest(model_file.parent)
    for out in (model_file, model_file.parent):
        res = sdgraph("optimize", model_file, "--passes", "fold", "-o", out)
        _assert_one_line_error(res, 2, "would overwrite the input")
    assert _digest(model_file.parent) == before


def test_unwritable_output_dir(model_file, tmp_path):
    # A path under a regular file can never be created, for root too.
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    res = sdgraph("optimize", model_file, "--passes", "fold", "-o", blocker / "sub" / "out")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1


def test_missing_input():
    res = sdgraph("optimize", "/nonexistent/model.onnx", "--passes", "fold", "-o", "/tmp/whatever-out")
    _assert_one_line_error(res, 2, "no such file")
