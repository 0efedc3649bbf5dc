"""kill -9 during saves: the output is the old one or the new one, whole; never a mix, never partial.

A run paused at a named point (``SDGRAPH_TEST_PAUSE_AT``: after the content is written, just before
the commit rename, just after it) is killed there; other runs are killed after a range of delays.
The next run into the same folder removes what the killed one left (``.X.tmp-<pid>-*``, orphan data).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from sdgraph.errors import InputError
from sdgraph.ir import runtime
from sdgraph.ir.model import Model
from tests.graphs import mlp_model, save_external
from tests.reliability.support import hidden, sdgraph, start, tally

# kill -9 of child processes at named points: ~45 s of CPU in all; part of the full suite, not the fast layer.
pytestmark = pytest.mark.slow


def _y(path: Path) -> np.ndarray:
    return runtime.run(Model.load(path), seed=3)["y"]


def _state(out: Path, old: np.ndarray, new: np.ndarray) -> str:
    """'absent', 'old' or 'new'; fails on anything else (a partial output, old graph with new weights)."""
    if not out.exists():
        return "absent"
    try:
        y = _y(out)
    except InputError as exc:
        pytest.fail(f"{out} is not a whole model after the kill: {exc}")
    if np.array_equal(y, old):
        return "old"
    if np.array_equal(y, new):
        return "new"
    pytest.fail(f"{out} mixes the old and the new output")


def _paused_kill(args: list, point: str, marker: Path) -> None:
    marker.unlink(missing_ok=True)
    p = start(*args, SDGRAPH_TEST_PAUSE_AT=point, SDGRAPH_TEST_PAUSE_FILE=str(marker))
    deadline = time.monotonic() + 300  # a guard against a hang, not a timing assertion
    while not marker.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), (p.poll(), p.communicate()[1] if p.poll() is not None else "")
    p.send_signal(signal.SIGKILL)
    p.wait()


@pytest.fixture()
def models(tmp_path):
    src_new = save_external(mlp_model(hidden=512, seed=0), tmp_path / "in" / "new.onnx")
    src_old = save_external(mlp_model(hidden=512, seed=1), tmp_path / "in" / "old.onnx")
    return src_old, src_new, _y(src_old), _y(src_new)


@pytest.mark.parametrize("point,expect", [("written", "old"), ("commit", "old"), ("committed", "new")])
@pytest.mark.parametrize("shape", ["file", "folder"])
def test_optimize_killed_at_a_named_point(tmp_path, models, point, expect, shape):
    src_old, src_new, y_old, y_new = models
    out = tmp_path / "o" / ("out.onnx" if shape == "file" else "out")
    Model.load(src_old).save(out)
    _paused_kill(["optimize", src_new, "-p", "fold", "-o", out, "--force"], point, tmp_path / "marker")
    state = _state(out, y_old, y_new)
    tally(f"kill -9 optimize -o {shape} at {point}", partial_output=state not in ("old", "new"))
    assert state == expect
    # the next run into that folder removes the killed run's leftovers
    res = sdgraph("optimize", src_new, "-p", "fold", "-o", out.parent / ("next.onnx" if shape == "file" else "next"))
    assert res.returncode == 0, res.stderr
    assert hidden(out.parent) == []
    datas = sorted(p.name for p in out.parent.glob("*.onnx_data"))
    assert len(datas) == (2 if shape == "file" else 0), datas  # out's and next's data; no orphan
    assert _state(out, y_old, y_new) == expect


@pytest.mark.parametrize("point", ["written", "commit"])
def test_lower_killed_before_the_commit_keeps_the_old_artifact(tmp_path, models, point):
    src_old, src_new, y_old, y_new = models
    out = tmp_path / "art"
    assert sdgraph("lower", src_old, "-t", "ort", "-o", out, "--no-cache").returncode == 0
    before = sorted(p.name for p in out.rglob("*"))
    _paused_kill(["lower", src_new, "-t", "ort", "-o", out, "--force", "--no-cache"], point, tmp_path / "marker")
    after = sorted(p.name for p in out.rglob("*"))
    tally(f"kill -9 lower at {point}", partial_output=after != before)
    assert after == before
    from sdgraph.targets.driver import load_artifact

    y = load_artifact(out).runner()({"x": runtime.seeded_inputs(Model.load(src_old), seed=3)["x"]})["y"]
    np.testing.assert_array_equal(y, y_old)
    assert sdgraph("lower", src_new, "-t", "ort", "-o", tmp_path / "art2", "--no-cache").returncode == 0
    assert hidden(tmp_path) == []


@pytest.mark.slow
def test_export_killed_before_the_commit_leaves_nothing(tmp_path, tiny_sd15_pipeline):
    out = tmp_path / "onnx"
    _paused_kill(["export", tiny_sd15_pipeline, "-o", out, "--submodels", "vae_decoder"], "commit", tmp_path / "marker")
    tally("kill -9 export at commit", partial_output=out.exists())
    assert not out.exists() and hidden(tmp_path) != []  # the temp folder stays until a later run
    res = sdgraph("demo-model", "-o", tmp_path / "other")
    assert res.returncode == 0, res.stderr
    assert hidden(tmp_path) == [] and not out.exists()


def test_optimize_killed_after_varied_delays(tmp_path):
    """Kill -9 at delays spread over a run's life (start-up, load, passes, write, commit)."""
    src_old = save_external(mlp_model(hidden=4096, seed=1), tmp_path / "in" / "old.onnx")
    src_new = save_external(mlp_model(hidden=4096, seed=0), tmp_path / "in" / "new.onnx")
    y_old, y_new = _y(src_old), _y(src_new)
    out = tmp_path / "o" / "out.onnx"
    Model.load(src_old).save(out)
    seen = []
    for delay in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0):
        p = start("optimize", src_new, "-p", "fold", "-o", out, "--force")
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        state = _state(out, y_old, y_new)
        tally("kill -9 optimize after a delay", note=f"{delay} s: {state}", partial_output=state not in ("old", "new"))
        seen.append(state)
        if state == "new":  # start over from the old output so later kills can catch a replace again
            Model.load(src_old).save(out, force=True)
    assert set(seen) <= {"old", "new"}, seen
    assert sdgraph("optimize", src_new, "-p", "fold", "-o", out, "--force").returncode == 0
    assert _state(out, y_old, y_new) == "new" and hidden(out.parent) == []
    assert len(list(out.parent.glob("*.onnx_data"))) == 1


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftovers_of_dead_processes_are_cleaned_live_ones_kept(tmp_path):
    from sdgraph.ir.outputs import clean_stale

    dead, live = _dead_pid(), os.getpid()
    (tmp_path / f".out.tmp-{dead}-ab12cd34").mkdir()
    (tmp_path / f".out.tmp-{dead}-ab12cd34" / "model.onnx").write_bytes(b"partial")
    (tmp_path / f".r.json.tmp-{dead}-0a0b0c0d").write_text("{")
    (tmp_path / f".mine.tmp-{live}-00000000").mkdir()
    (tmp_path / f".gone.old-{dead}-12345678").mkdir()  # killed between the two renames of a swap
    (tmp_path / f".gone.old-{dead}-12345678" / "keep.txt").write_text("old output")
    (tmp_path / ".not-ours.tmp").write_text("user file")
    clean_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".mine.tmp-{live}-00000000", ".not-ours.tmp", "gone"]
    assert (tmp_path / "gone" / "keep.txt").read_text() == "old output"  # the old output is put back
    tally("stale temp leftovers of a dead pid")


def test_swap_without_renameat2_still_commits_once(tmp_path, monkeypatch):
    """Where the kernel cannot exchange two paths, the two-rename swap leaves the new folder, no leftovers."""
    from sdgraph.ir import outputs

    monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    src = save_external(mlp_model(hidden=256), tmp_path / "in" / "m.onnx")
    out = tmp_path / "o"
    Model.load(src).save(out)
    (out / "extra.txt").write_text("old")
    Model.load(src).save(out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx_data"]
    assert hidden(tmp_path) == []
    tally("folder replace without renameat2")
