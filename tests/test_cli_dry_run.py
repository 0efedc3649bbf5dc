"""``--dry-run`` and ``--json`` on optimize and lower: the plan and the cache decision, nothing written."""

from __future__ import annotations

import json
import os

from typer.testing import CliRunner

from sdgraph.cli import app
from tests.graphs import mlp_model, save_external


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else None


def test_optimize_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    src = save_external(mlp_model(hidden=64), tmp_path / "m" / "model.onnx")
    before = _tree(tmp_path)
    r = _invoke("optimize", src, "-p", " fold , cleanup", "-o", tmp_path / "out", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["dry_run"] is True and plan["pipeline"] == "fold,fold,cse"
    assert [p["name"] for p in plan["passes"]] == ["fold", "fold", "cse"]
    (sub,) = plan["submodels"].values()
    assert sub["nodes"] == 4  # MatMul, Relu, Reshape, MatMul: the graph was loaded and checked
    assert _tree(tmp_path) == before  # nothing written, no temp left
    r = _invoke("optimize", src, "-p", "fold", "-o", tmp_path / "out", "--dry-run")
    assert r.exit_code == 0 and "would write" in r.output and not (tmp_path / "out").exists()
    # the same refusals as a real run
    assert _invoke("optimize", src, "-p", "nosuchpass", "-o", tmp_path / "o2", "--dry-run").exit_code == 2
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep")
    assert _invoke("optimize", src, "-p", "fold", "-o", tmp_path / "busy", "--dry-run").exit_code == 2


def test_optimize_json_is_the_report(tmp_path):
    src = save_external(mlp_model(hidden=64), tmp_path / "m" / "model.onnx")
    r = _invoke("optimize", src, "-p", "fold,cse", "-o", tmp_path / "out.onnx", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    (only,) = rep.values()
    assert [x["spec"] for x in only["records"]] == ["fold", "cse"]
    assert sum(only["ops_after"].values()) <= sum(only["ops_before"].values())
    assert (tmp_path / "out.onnx").is_file()


def test_lower_dry_run_says_the_cache_decision_and_touches_nothing(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SDGRAPH_CACHE_DIR", str(cache))
    src = save_external(mlp_model(hidden=64), tmp_path / "m" / "model.onnx")
    r = _invoke("lower", src, "-t", "ort", "-o", tmp_path / "a", "--shape", "x=1x16", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["dry_run"] is True and not (tmp_path / "a").exists()
    (sub,) = plan["submodels"].values()
    assert sub["cache"] == "miss" and sub["shapes"] == [{"x": [1, 16]}] and sub["precision"] == "fp32"
    assert not list(cache.rglob("entry.json"))  # a dry run stores nothing
    r = _invoke("lower", src, "-t", "ort", "-o", tmp_path / "a", "--shape", "x=1x16", "--json")
    assert r.exit_code == 0, r.output
    real = json.loads(r.stdout)
    assert real["dry_run"] is False and (tmp_path / "a" / "sdgraph.json").is_file()
    assert sum(len(f) for f in real["files"].values()) >= 1
    (entry,) = cache.rglob("entry.json")
    stamp = entry.stat().st_mtime_ns
    os.utime(entry, ns=(stamp - 10**9, stamp - 10**9))  # an older use, so a touch would show
    r = _invoke("lower", src, "-t", "ort", "-o", tmp_path / "b", "--shape", "x=1x16", "--dry-run")
    assert r.exit_code == 0, r.output
    assert "cache hit" in r.output and "would write" in r.output and not (tmp_path / "b").exists()
    assert entry.stat().st_mtime_ns == stamp - 10**9  # peeked, not counted as a use
    r = _invoke("lower", src, "-t", "ort", "-o", tmp_path / "c", "--shape", "x=1x16", "--no-cache", "--dry-run", "--json")
    (sub,) = json.loads(r.stdout)["submodels"].values()
    assert sub["cache"] == "off"
