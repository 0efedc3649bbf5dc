"""Pass plugins from the CLI: --plugin files (optimize, passes, lower) and the sdgraph.passes entry-point group."""

from __future__ import annotations

import pytest
import os
import subprocess
import sys

from tests.graphs import mlp_model, save_external
from tests.test_cli import _assert_one_line_error, _digest, sdgraph

PLUGIN = '''
import numpy as np
import onnx_graphsurgeon as gs
from sdgraph.passes import Option, Pass, PassResult, register


@register
class DoubleRelu(Pass):
    """Insert a second Relu after each Relu (exact: Relu is idempotent)."""
    name = "double-relu"
    summary = "Relu -> Relu, Relu (plugin test pass)"
    options = (Option("times", int, 1, "extra Relus per Relu", positional=True),)

    def run(self, model):
        n = 0
        for node in [x for x in model.graph.nodes if x.op == "Relu"]:
            out = node.outputs[0]
            mid = gs.Variable(out.name + "_pre", dtype=out.dtype, shape=out.shape)
            node.outputs[0] = mid
            model.graph.nodes.append(gs.Node("Relu", node.name + "_again", inputs=[mid], outputs=[out]))
            n += 1
        return PassResult(modified=n > 0, stats={"added": n})


@register
class BreakLoad(Pass):
    """Gives the first MatMul a weight of the wrong shape: ONNX Runtime refuses the graph."""
    name = "break-load"
    summary = "plugin test pass ORT cannot load"

    def run(self, model):
        mm = next(x for x in model.graph.nodes if x.op == "MatMul")
        mm.inputs[1] = gs.Constant("bad_w", np.ones((3, 5), np.float32))
        return PassResult(modified=True)
'''


def _plugin(tmp_path):
    f = tmp_path / "my_passes.py"
    f.write_text(PLUGIN)
    return f


@pytest.mark.slow  # CLI subprocesses (each imports torch and the runtimes)
def test_plugin_file_on_passes_and_optimize(tmp_path):
    plugin = _plugin(tmp_path)
    res = sdgraph("passes", "--plugin", plugin)
    assert res.returncode == 0 and "double-relu  (exact) Relu -> Relu, Relu (plugin test pass)" in res.stdout
    src = save_external(mlp_model(hidden=64), tmp_path / "m" / "model.onnx")
    before = _digest(src.parent)
    res = sdgraph("optimize", src, "--plugin", plugin, "--passes", "fold,double-relu", "-o", tmp_path / "o.onnx", "--verify")
    assert res.returncode == 0, res.stderr
    assert "added=1" in res.stdout and _digest(src.parent) == before
    res = sdgraph("optimize", src, "--passes", "double-relu", "-o", tmp_path / "o2.onnx")  # not loaded without --plugin
    _assert_one_line_error(res, 2, "unknown pass 'double-relu'")


@pytest.mark.slow  # CLI subprocesses (each imports torch and the runtimes)
def test_verify_rolls_back_a_plugin_pass_ort_cannot_load(tmp_path):
    src = save_external(mlp_model(hidden=64), tmp_path / "m" / "model.onnx")
    res = sdgraph("optimize", src, "--plugin", _plugin(tmp_path), "--passes", "fold,break-load", "-o", tmp_path / "o.onnx",
                  "--verify")
    _assert_one_line_error(res, 1, "pass 2 'break-load' failed and was rolled back: the graph no longer runs: "
                                   "ONNX Runtime cannot load")
    assert "(passes before it: fold)" in res.stderr and not (tmp_path / "o.onnx").exists()


@pytest.mark.slow  # CLI subprocesses (each imports torch and the runtimes)
def test_bad_plugins_are_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import numpy\nraise RuntimeError('plugin says no')\n")
    _assert_one_line_error(sdgraph("passes", "--plugin", bad), 2, "--plugin " + str(bad) + ": cannot import it: RuntimeError: plugin says no")
    syntax = tmp_path / "syn.py"
    syntax.write_text("def broken(:\n")
    _assert_one_line_error(sdgraph("passes", "--plugin", syntax), 2, "cannot import it: SyntaxError")
    _assert_one_line_error(sdgraph("passes", "--plugin", tmp_path / "none.py"), 2, "no such file")
    res = sdgraph("lower", tmp_path, "-t", "ort", "-o", tmp_path / "a", "--plugin", bad)
    _assert_one_line_error(res, 2, "plugin says no")


def _dist(tmp_path, value: str):
    """A distribution visible to importlib.metadata (a .dist-info folder on the path) with one entry point."""
    site = tmp_path / "site"
    (site / "acme_passes").mkdir(parents=True)
    (site / "acme_passes" / "__init__.py").write_text(PLUGIN)
    info = site / "acme_passes-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-passes\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[sdgraph.passes]\nacme = {value}\n")
    return site


@pytest.mark.slow  # CLI subprocesses (each imports torch and the runtimes)
def test_entry_point_group_registers_passes(tmp_path):
    site = _dist(tmp_path, "acme_passes")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]), COLUMNS="200")
    res = subprocess.run([sys.executable, "-m", "sdgraph", "passes"], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and "double-relu" in res.stdout and "break-load" in res.stdout, res.stderr
    broken = _dist(tmp_path / "b", "acme_passes.missing:Nope")
    env["PYTHONPATH"] = os.pathsep.join([str(broken), os.environ.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-m", "sdgraph", "passes"], capture_output=True, text=True, env=env)
    _assert_one_line_error(res, 2, "entry point 'acme' (acme_passes.missing:Nope, from acme-passes) in group "
                                   "'sdgraph.passes' cannot be loaded: ModuleNotFoundError")
