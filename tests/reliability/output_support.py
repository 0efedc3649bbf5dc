"""Shared by the output-safety tests: run the CLI, snapshot a folder, check a refusal, tally the cases.

``SDGRAPH_RELIABILITY_TALLY=<file>`` appends one JSON line per checked case (kind, and what went
wrong: traceback, wrong exit code, input modified, partial output, stale cache hit); the table in
docs/reliability-outputs.md is summed from such a run.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, COLUMNS="200", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def sdgraph(*args, cwd=None, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdgraph", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=cli_env(**env))


def invoke(*args, cwd=None) -> subprocess.CompletedProcess:
    """The CLI in this process (much faster than a subprocess per case); an escaped exception counts
    as a traceback."""
    import traceback

    from typer.testing import CliRunner

    from sdgraph.cli import app

    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        r = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    finally:
        os.chdir(old)
    err = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        err += "Traceback (escaped):\n" + "".join(traceback.format_exception(r.exception))
    return subprocess.CompletedProcess(list(args), r.exit_code, r.stdout, err)


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (links not followed): a file's sha256, 'dir', or the link's target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link->" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def tally(kind: str, note: str = "", **problems: bool) -> None:
    path = os.environ.get("SDGRAPH_RELIABILITY_TALLY")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"kind": kind, "note": note, **{k: bool(v) for k, v in problems.items()}}) + "\n")


def check_refused(kind: str, res: subprocess.CompletedProcess, code: int, match: str,
                  before: dict[str, str], after: dict[str, str]) -> None:
    """Exit ``code``, exactly one ``error:`` line (the last; progress lines may precede it) containing
    ``match``, no traceback, nothing changed."""
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    traceback = "Traceback" in res.stderr + res.stdout
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    modified = {k for k in changed if k in before}
    stray = {k for k in changed if k not in before}
    tally(kind, traceback=traceback, wrong_exit=res.returncode != code, input_modified=bool(modified),
          partial_output=bool(stray))
    assert not traceback, res.stderr
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert len(errors) == 1 and lines[-1] == errors[0] and match in errors[0], res.stderr
    assert not modified, f"modified: {sorted(modified)}"
    assert not stray, f"stray or partial output: {sorted(stray)}"


def start(*args, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sdgraph", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env(**env))


def hidden(folder: Path) -> list[str]:
    """Temporary leftovers (``.X.tmp-*``, ``.X.old-*``) in a folder."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name))
