"""Two processes writing one output, and two lowering one cache key, at the same time."""

from __future__ import annotations

import pytest
from pathlib import Path

import numpy as np

from sdgraph.ir import runtime
from sdgraph.ir.model import Model
from tests.graphs import mlp_model, save_external
from tests.reliability.support import hidden, start, tally


pytestmark = pytest.mark.slow  # pairs of CLI processes racing on one output or cache key

def _y(path: Path) -> np.ndarray:
    return runtime.run(Model.load(path), seed=3)["y"]


def _both(*argvs, **env):
    procs = [start(*a, **env) for a in argvs]
    return [(p.wait(), *p.communicate()) for p in procs]


def test_two_forced_writers_to_one_output(tmp_path):
    a = save_external(mlp_model(hidden=1024, seed=0), tmp_path / "in" / "a.onnx")
    b = save_external(mlp_model(hidden=1024, seed=1), tmp_path / "in" / "b.onnx")
    out = tmp_path / "o" / "out.onnx"
    res = _both(["optimize", a, "-p", "fold", "-o", out, "--force"], ["optimize", b, "-p", "fold", "-o", out, "--force"])
    assert [r[0] for r in res] == [0, 0], res
    y = _y(out)
    whole = np.array_equal(y, _y(a)) or np.array_equal(y, _y(b))
    tally("two --force writers to one .onnx", partial_output=not whole or hidden(out.parent) != [])
    assert whole
    assert hidden(out.parent) == [] and len(list(out.parent.glob("*.onnx_data"))) == 1


def test_two_writers_without_force_one_wins(tmp_path):
    a = save_external(mlp_model(hidden=1024, seed=0), tmp_path / "in" / "a.onnx")
    b = save_external(mlp_model(hidden=1024, seed=1), tmp_path / "in" / "b.onnx")
    out = tmp_path / "o" / "out"
    res = _both(["optimize", a, "-p", "fold", "-o", out], ["optimize", b, "-p", "fold", "-o", out])
    codes = sorted(r[0] for r in res)
    loser = next(r for r in res if r[0] != 0)
    lines = [line for line in loser[2].splitlines() if line.strip()]
    tally("two writers to one folder, no --force", wrong_exit=codes != [0, 2], traceback="Traceback" in loser[2])
    assert codes == [0, 2], res
    assert len(lines) == 1 and lines[0].startswith("error: ") and "use --force" in lines[0], loser[2]
    y = _y(out)
    assert np.array_equal(y, _y(a)) or np.array_equal(y, _y(b))
    assert hidden(out.parent) == [] and sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx_data"]


def test_two_processes_lowering_one_cache_key(tmp_path):
    src = save_external(mlp_model(hidden=1024), tmp_path / "in" / "model.onnx")
    cache = tmp_path / "cache"
    res = _both(["lower", src, "-t", "ort", "-o", tmp_path / "a1"], ["lower", src, "-t", "ort", "-o", tmp_path / "a2"],
                SDGRAPH_CACHE_DIR=str(cache))
    assert [r[0] for r in res] == [0, 0], res
    states = sorted("hit" if "cache hit" in r[2] else "miss" for r in res)
    tally("two lowers of one cache key", stale_cache_hit=states != ["hit", "miss"])
    assert states == ["hit", "miss"], [r[2] for r in res]  # the second waited for the first's entry
    assert len(list(cache.glob("ort/*/entry.json"))) == 1
    def files(d):
        return {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file() and p.name != "sdgraph.json"}

    assert files(tmp_path / "a1") == files(tmp_path / "a2")
