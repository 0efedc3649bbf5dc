"""Shared by the reliability tests: run the CLI (in this process or as ``python -m sdgraph``), record
a folder tree, check a refusal, tally the cases, and build broken models.

``SDGRAPH_RELIABILITY_TALLY=<file>`` appends one JSON line per checked case (kind, and what went
wrong: traceback, wrong exit code, input modified, partial output, stale cache hit); the tables in
docs/reliability.md and docs/reliability-outputs.md are summed from such runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io as _io
import json
import os
import stat
import subprocess
import sys
import traceback
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]


# -- running the CLI --------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def returncode(self) -> int:
        return self.code

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: this checkout first on PYTHONPATH, wide lines."""
    env = dict(os.environ, COLUMNS="200", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def invoke(*args, subprocess_run: bool = False, cwd: Path | None = None, env: dict[str, str] | None = None) -> Result:
    """Run ``sdgraph ARGS`` (``invoke("optimize", x)`` or ``invoke(["optimize", x])``) through the real
    entry point, in this process (much faster than a subprocess per case) or as ``python -m sdgraph``.

    In-process, an exception escaping the entry point is reported as a traceback on stderr, the
    way the interpreter would print it.
    """
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        args = tuple(args[0])
    args = [str(a) for a in args]
    if subprocess_run:
        p = subprocess.run([sys.executable, "-m", "sdgraph", *args], capture_output=True, text=True, cwd=cwd,
                           env=cli_env(**(env or {})), errors="replace")
        return Result(p.returncode, p.stdout, p.stderr)
    from sdgraph.cli import _load_commands
    from sdgraph.cli._app import run_app

    _load_commands()
    out, err = _io.StringIO(), _io.StringIO()
    env = {"COLUMNS": "200", **(env or {})}
    old_env = {k: os.environ.get(k) for k in env}
    old_cwd = os.getcwd()
    try:
        os.environ.update(env)
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = run_app(args=args)
            except SystemExit as exc:  # pragma: no cover - the entry point returns codes
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                err.write("Traceback (most recent call last):\n" + traceback.format_exc())
                code = 1
    finally:
        os.chdir(old_cwd)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return Result(code, out.getvalue(), err.getvalue())


def sdgraph(*args, cwd=None, **env: str) -> Result:
    """``python -m sdgraph ARGS`` in a subprocess (for what must be a real process: kills, locks, caches)."""
    return invoke(*args, subprocess_run=True, cwd=cwd, env=env)


# -- recording a tree -------------------------------------------------------------------------
def _entries(root: Path) -> Iterator[tuple[Path, str]]:
    """``root`` and every entry under it (links not followed) with a digest of its bytes or its kind.

    FIFOs, sockets and devices are never opened; a symbolic link records its target.
    """
    paths = [root]
    if root.is_dir() and not root.is_symlink():
        for dirpath, dirnames, filenames in os.walk(root):
            paths += [Path(dirpath) / n for n in dirnames + filenames]
    for p in paths:
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            yield p, "link:" + os.readlink(p)
        elif stat.S_ISREG(st.st_mode):
            yield p, hashlib.sha256(p.read_bytes()).hexdigest()
        elif stat.S_ISDIR(st.st_mode):
            yield p, "dir"
        else:
            yield p, f"special:{stat.S_IFMT(st.st_mode)}"


def tree_state(*roots: Path) -> dict[str, str]:
    """Every entry of ``roots`` by its full path (see :func:`_entries`); a missing root is ``absent``."""
    state: dict[str, str] = {}
    for root in map(Path, roots):
        if not os.path.lexists(root):
            state[str(root)] = "absent"
            continue
        state.update((str(p), s) for p, s in _entries(root))
    return state


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` by its path relative to it (the root itself left out; {} when missing)."""
    root = Path(root)
    if not os.path.lexists(root):
        return {}
    return {str(p.relative_to(root)): s for p, s in _entries(root) if p != root}


# -- checking a refusal, tallying -------------------------------------------------------------
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


# -- tiny graphs ------------------------------------------------------------------------------
def tiny_graph(nodes, inputs=("x",), outputs=("y",), initializers=(), shape=(1, 4)) -> onnx.ModelProto:
    g = helper.make_graph(
        list(nodes), "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(shape)) for n in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(shape)) for n in outputs],
        list(initializers),
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def externalize(t: onnx.TensorProto, folder: Path, file: str, **override: str) -> None:
    """Move ``t``'s bytes to the end of ``folder/file``; ``override`` replaces reference keys (location...)."""
    raw = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
    f = folder / file
    f.parent.mkdir(parents=True, exist_ok=True)
    offset = f.stat().st_size if f.exists() else 0
    with open(f, "ab") as fh:
        fh.write(raw)
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
        t.ClearField(field)
    t.data_location = TensorProto.EXTERNAL
    info = {"location": file, "offset": str(offset), "length": str(len(raw)), **override}
    for k, v in info.items():
        e = t.external_data.add()
        e.key, e.value = k, v


def weights_model(folder: Path, *, where: str = "initializer", **override: str) -> Path:
    """x[1,16] @ W[16,32] -> y[1,32] with W (2 KiB) in external data ``w.bin``, placed at ``where``:

    initializer | constant (a Constant node) | function (a local function's body) | subgraph (an
    If branch) | sparse (a sparse initializer). ``override`` breaks the reference (offset=-1 ...).
    """
    folder.mkdir(parents=True, exist_ok=True)
    w = numpy_helper.from_array(np.arange(512, dtype=np.float32).reshape(16, 32) / 512, "w")
    shape = (1, 32)
    functions = []
    inits: list = []
    sparse: list = []
    if where == "initializer":
        inits = [w]
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    elif where == "constant":
        nodes = [helper.make_node("Constant", [], ["w"], name="c", value=w),
                 helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    elif where == "function":
        functions = [helper.make_function("local", "Lin", ["a"], ["b"], [
            helper.make_node("Constant", [], ["w"], value=w), helper.make_node("MatMul", ["a", "w"], ["b"])],
            [helper.make_opsetid("", 17)])]
        nodes = [helper.make_node("Lin", ["x"], ["y"], domain="local", name="lin")]
    elif where == "subgraph":
        then_g = helper.make_graph([helper.make_node("Constant", [], ["w"], value=w),
                                    helper.make_node("MatMul", ["x", "w"], ["t"])], "then", [],
                                   [helper.make_tensor_value_info("t", TensorProto.FLOAT, list(shape))])
        else_g = helper.make_graph([helper.make_node("Concat", ["x", "x"], ["e"], axis=1)], "else", [],
                                   [helper.make_tensor_value_info("e", TensorProto.FLOAT, list(shape))])
        inits = [numpy_helper.from_array(np.array(True), "cond")]
        nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
    elif where == "sparse":
        values = numpy_helper.from_array(np.arange(1, 301, dtype=np.float32), "sw")
        indices = numpy_helper.from_array(np.arange(300, dtype=np.int64), "sw_idx")
        sparse = [helper.make_sparse_tensor(values, indices, [300])]
        nodes = [helper.make_node("Concat", ["x", "x"], ["y"], name="cat", axis=1)]
    else:  # pragma: no cover
        raise ValueError(where)
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))], inits,
                          sparse_initializer=sparse)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                          functions=functions)
    m.ir_version = 10
    for t in _tensors(m):
        if t.name in ("w", "sw"):
            externalize(t, folder, "w.bin", **override)
    return save(m, folder / "model.onnx")


def _tensors(m: onnx.ModelProto):
    """Every tensor of the model (built here, not with the code under test)."""
    def graph(g):
        yield from g.initializer
        for sp in g.sparse_initializer:
            yield sp.values
        yield from nodes(g.node)

    def nodes(ns):
        for n in ns:
            for a in n.attribute:
                if a.HasField("t"):
                    yield a.t
                if a.HasField("g"):
                    yield from graph(a.g)

    yield from graph(m.graph)
    for fn in m.functions:
        yield from nodes(fn.node)


def png_bomb(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A tiny PNG whose header declares ``width`` x ``height`` pixels (Pillow refuses it as a bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    idat = zlib.compress(b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path
