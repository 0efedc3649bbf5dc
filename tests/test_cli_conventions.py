"""Conventions every command shares: --version, -v/-q, shell completion, --json, 80-column output."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def sdgraph(*args, columns=None):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if columns:
        env["COLUMNS"] = str(columns)
    return subprocess.run([sys.executable, "-m", "sdgraph", *map(str, args)], capture_output=True, text=True, env=env)


def test_version():
    import sdgraph as pkg

    r = sdgraph("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"sdgraph {pkg.__version__}"


def test_help_offers_completion_and_global_flags():
    r = sdgraph("--help", columns=120)
    assert r.returncode == 0
    for flag in ("--install-completion", "--show-completion", "--version", "--verbose", "--quiet"):
        assert flag in r.stdout, flag


_RUNTIME_HEAVY = pytest.mark.slow  # targets and doctor import every optional runtime


@pytest.mark.parametrize("command", [pytest.param("targets", marks=_RUNTIME_HEAVY), pytest.param("doctor", marks=_RUNTIME_HEAVY), "passes"])
def test_readable_at_80_columns(command):
    r = sdgraph(command, columns=80)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) > 5
    assert max(len(line.rstrip()) for line in lines) <= 80
    assert "…" not in r.stdout  # nothing cut with an ellipsis
    if command == "targets":  # too wide for a table at 80 columns: one block per target, every field there
        from sdgraph.targets.base import targets

        for name in targets():
            assert name in lines
        assert sum(line.strip().startswith("summary:") for line in lines) == len(targets())


@pytest.mark.slow  # three CLI runs that import every optional runtime: ~10 s of CPU
def test_wide_terminal_gets_a_table():
    r = sdgraph("doctor", columns=2000)  # wider than its longest row (873 on a CPU the engine dies on)
    assert r.returncode == 0
    assert "┃ part" in r.stdout


@pytest.mark.slow  # three CLI runs that import every optional runtime: ~17 s of CPU
def test_json_of_targets_doctor_passes():
    from sdgraph.doctor import checks
    from sdgraph.passes.base import registry
    from sdgraph.passes.pipeline import PRESETS
    from sdgraph.targets.base import targets

    t = json.loads(sdgraph("targets", "--json").stdout)
    assert [x["target"] for x in t] == list(targets())
    assert set(t[0]) == {"target", "usable_here", "precisions", "shapes", "canonical_ops", "options", "summary"}
    assert all(isinstance(x["precisions"], list) for x in t)
    d = json.loads(sdgraph("doctor", "--json").stdout)
    assert [x["part"] for x in d] == [c[0] for c in checks()]
    assert all(isinstance(x["usable"], bool) for x in d)
    p = json.loads(sdgraph("passes", "--json").stdout)
    names = [x["name"] for x in p["passes"]]  # a fresh process: the built-in passes (tests may register more here)
    assert names == sorted(names) and set(names) <= set(registry())
    assert {"fold", "cse", "fa", "gn", "geglu", "tome", "qdq", "bf16", "fp16"} <= set(names)
    assert p["presets"] == dict(PRESETS)
    tome = next(x for x in p["passes"] if x["name"] == "tome")
    assert any(o["positional"] for o in tome["options"]) and not tome["exact"]


@pytest.mark.slow  # CLI runs that import every optional runtime
def test_quiet_silences_tables_but_not_requested_json():
    r = sdgraph("-q", "targets")
    assert r.returncode == 0 and r.stdout == ""
    r = sdgraph("-q", "targets", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)


def test_verbose_raises_the_log_level():
    from typer.testing import CliRunner

    from sdgraph.cli import app

    log = logging.getLogger("sdgraph")
    old = log.level
    try:
        assert CliRunner().invoke(app, ["-v", "targets", "--json"]).exit_code == 0
        assert log.level == logging.INFO
        assert CliRunner().invoke(app, ["-vv", "targets", "--json"]).exit_code == 0
        assert log.level == logging.DEBUG
    finally:
        log.setLevel(old)


def test_quiet_lasts_one_invocation_in_process():
    """-q in one in-process call (tests, an embedding program) does not silence the next one."""
    from typer.testing import CliRunner

    from sdgraph.cli import app

    assert CliRunner().invoke(app, ["-q", "passes"]).output.strip() == ""
    loud = CliRunner().invoke(app, ["passes"])
    assert loud.exit_code == 0 and "fold" in loud.output
