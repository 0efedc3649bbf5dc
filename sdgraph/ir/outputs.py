"""Every output sdgraph writes goes through here: the input guard, ``--force``, and one commit point.

* ``guard_output`` refuses, before any work, an output that equals, contains or lies inside an
  input, and an existing non-empty output without ``force``.
* ``atomic_dir`` / ``atomic_file`` / ``atomic_model_file`` write into a sibling temporary location
  (``.<name>.tmp-<pid>-<random>``), fsync the content, then commit with a single rename (a directory
  replacing a directory is swapped in with ``renameat2(RENAME_EXCHANGE)``). A single ``.onnx`` file
  names a uniquely-named data file (``<stem>.<8 hex>.onnx_data``), so the graph's rename commits
  graph and weights together.
* Leftovers of killed runs (their pid is gone) are removed by the next commit into that folder.
* Commits into one folder are serialized with ``flock`` on the folder, so concurrent writers never
  interleave; without ``force`` the second one is refused.
* Running out of space (or any other refused write) is a bad-environment error (exit 2), never a
  traceback.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Iterable, Iterator

from sdgraph.errors import InputError

__all__ = [
    "atomic_dir",
    "atomic_file",
    "atomic_model_file",
    "check_output_path",
    "clean_stale",
    "guard_output",
    "model_inputs",
    "pause_point",
    "real_output",
    "temp_name",
]

log = logging.getLogger(__name__)

_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-z]+$")
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EMLINK}


# -- where an output really is -------------------------------------------------------------------
def real_output(path: str | os.PathLike) -> Path:
    """The absolute path an output lands on: a symlinked ``-o`` writes through to its target."""
    return Path(os.path.realpath(os.path.abspath(path)))


def model_inputs(src: str | os.PathLike) -> list[Path]:
    """The paths an input model consists of: a folder as a whole, or a graph file and its data files.

    External data referenced from the graph, its subgraphs and function bodies is listed (resolved,
    even when it escapes the folder: loading refuses that, the guard must still protect it).
    """
    p = Path(src)
    if not p.exists():
        return [p]
    if p.is_dir():
        return [p]
    files = [p]
    try:
        import onnx

        from sdgraph.ir.proto import external_data_files

        proto = onnx.load(str(p), load_external_data=False)
    except Exception:  # not ONNX (or unreadable): loading will say so; the file itself is protected
        return files
    files += external_data_files(proto, p.parent)
    return list(dict.fromkeys(files))


def _relation(out: Path, inp: Path) -> str | None:
    if out == inp:
        return "is"
    if out in inp.parents:
        return "contains"
    if inp in out.parents:
        return "lies inside"
    return None


def check_output_path(out: str | os.PathLike, inputs: Iterable[str | os.PathLike], force: bool = True,
                      what: str = "output") -> Path:
    """Refuse an output that is, contains or lies inside an input, one that exists without ``force``,
    or one that cannot be written. Returns the real output path. One line naming both paths.
    """
    out = Path(out)
    out_r = real_output(out)
    for inp in inputs:
        if inp is None:
            continue
        inp_r = real_output(inp)
        rel = _relation(out_r, inp_r)
        if rel == "lies inside" and not inp_r.is_dir():
            rel = None
        if rel is not None:
            shown = {"is": f"would overwrite the input {inp}",
                     "contains": f"would overwrite the input {inp} (it lies inside the {what})",
                     "lies inside": f"lies inside the input folder {inp}"}[rel]
            raise InputError(f"{out}: {what} {shown}; choose another {what} path")
    cwd = real_output(".")
    if out_r == cwd or out_r in cwd.parents or out_r == Path(out_r.anchor):
        raise InputError(f"{out}: {what} would replace the current folder (or one above it); name a new path")
    if out_r.exists() and _non_empty(out_r) and not force:
        raise _exists(out, out_r, what)
    parent = out_r.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK) or (out_r.exists() and not os.access(out_r, os.W_OK)):
        raise InputError(f"{out}: {what} location is not writable")
    return out_r


guard_output = check_output_path


def _exists(shown: Path, real: Path, what: str = "output") -> InputError:
    """The one line for an existing non-empty output without ``force``."""
    if real.is_dir():
        return InputError(f"{shown}: {what} folder is not empty (use --force to replace it)")
    return InputError(f"{shown}: {what} exists (use --force to replace it)")


def _non_empty(p: Path) -> bool:
    if p.is_dir():
        return any(p.iterdir())
    try:
        return p.stat().st_size > 0
    except OSError:
        return False


# -- temporary names, stale leftovers --------------------------------------------------------------
def temp_name(final: Path, kind: str = "tmp") -> Path:
    """``<dir>/.<name>.<kind>-<pid>-<random>``: the pid tells a later run whether its owner is gone."""
    return final.parent / f".{final.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove ``.X.tmp-<pid>-*`` leftovers of dead processes in ``folder``; put back a ``.X.old-*``
    whose ``X`` is missing (a run killed in the middle of a two-rename swap). Returns what it removed.
    """
    folder = Path(folder)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = _TEMP_RE.match(e.name)
        if not m or _alive(int(m["pid"])):
            continue
        p = Path(e.path)
        final = folder / m["name"]
        if m["kind"] == "old" and not os.path.lexists(final):
            with contextlib.suppress(OSError):
                os.rename(p, final)
                log.info("restored %s from an interrupted replace", final)
                continue
        _remove(p)
        removed.append(p)
    removed += _orphan_data(folder)
    return removed


_DATA_RE = re.compile(r"^(?P<stem>.+)\.[0-9a-f]{8}\.onnx_data$")


def _orphan_data(folder: Path) -> list[Path]:
    """Uniquely-named data files (``<stem>.<8 hex>.onnx_data``) no ``.onnx`` file of the folder names:
    what a run killed between the data's rename and the graph's rename leaves behind.
    """
    candidates = [p for p in folder.glob("*.onnx_data") if _DATA_RE.match(p.name)]
    if not candidates:
        return []
    referenced: set[str] = set()
    for g in folder.glob("*.onnx"):
        try:
            if g.stat().st_size > (256 << 20):
                return []  # too big to read here: keep everything rather than guess
            referenced |= {f.name for f in _data_files_of(g)}
        except OSError:
            return []
    gone = []
    for p in candidates:
        if p.name not in referenced:
            _remove(p)
            gone.append(p)
    return gone


def _data_files_of(graph_file: Path) -> list[Path]:
    """The external-data files a graph file refers to (resolved); [] when it cannot be parsed."""
    if not graph_file.is_file():
        return []
    return [f for f in model_inputs(graph_file) if f != graph_file]


def _remove(p: Path) -> None:
    with contextlib.suppress(OSError):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink()


# -- test hook ------------------------------------------------------------------------------------
def pause_point(name: str) -> None:
    """``SDGRAPH_TEST_PAUSE_AT=<name>``: stop here (tests kill the process at a named point).

    Writes ``paused <name>`` to ``$SDGRAPH_TEST_PAUSE_FILE`` (if set) and sleeps until killed.
    """
    if os.environ.get("SDGRAPH_TEST_PAUSE_AT") != name:
        return
    marker = os.environ.get("SDGRAPH_TEST_PAUSE_FILE")
    if marker:
        Path(marker).write_text(f"paused {name} {os.getpid()}\n")
    while True:  # pragma: no cover - killed by the test
        time.sleep(1)


# -- durability ----------------------------------------------------------------------------------
def _fsync_path(p: Path, directory: bool = False) -> None:
    fd = os.open(p, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EROFS):  # some filesystems cannot fsync a directory
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    if root.is_file():
        _fsync_path(root)
        return
    for dirpath, _, filenames in os.walk(root):
        for f in filenames:
            fp = Path(dirpath) / f
            if fp.is_file() and not fp.is_symlink():
                _fsync_path(fp)
        _fsync_path(Path(dirpath), directory=True)


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive ``flock`` on the folder itself: commits into one folder never interleave."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def _undo_on_failure(shown: Path, paths: list[Path]) -> Iterator[None]:
    """On any failure remove ``paths`` (temporaries); a refused write (disk full ...) becomes one line."""
    try:
        yield
    except BaseException as exc:
        for p in paths:
            _remove(p)
        if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
            raise InputError(f"{shown}: cannot write the output ({exc.strerror or exc})") from None
        raise


def _mkdirs(folder: Path, shown: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{shown}: cannot create the output's folder {folder} ({exc.strerror})") from None


def _umask_mode(base: int) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def _committed(final: Path) -> None:
    """After the rename that commits ``final``: make it durable (fsync its folder)."""
    _fsync_path(final.parent, directory=True)
    pause_point("committed")


def _commit(tmp: Path, final: Path, shown: Path, force: bool) -> None:
    """Under the folder lock: refuse an existing output without ``force``, then one rename."""
    with _folder_lock(final.parent):
        clean_stale(final.parent)
        if os.path.lexists(final) and _non_empty(final) and not force:
            raise _exists(shown, final)
        pause_point("commit")
        if os.path.lexists(final) and (final.is_dir() or tmp.is_dir()):
            if _exchange(tmp, final):
                _committed(final)
                _remove(tmp)  # now the old output
                return
            old = temp_name(final, "old")
            os.rename(final, old)
            pause_point("swap")
            os.rename(tmp, final)
            _committed(final)
            _remove(old)
            return
        os.replace(tmp, final)
        _committed(final)


def _file_output(path: str | os.PathLike, force: bool, what: str) -> tuple[Path, Path]:
    """(shown, real) for a file output: refuse a directory, an existing one without ``force``; make its folder."""
    shown = Path(path)
    final = real_output(path)
    if final.is_dir():
        raise InputError(f"{shown}: is a directory, not {what}")
    if final.exists() and _non_empty(final) and not force:
        raise _exists(shown, final)
    _mkdirs(final.parent, shown)
    return shown, final


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` in one commit.

    If the body raises, the temporary directory is removed and ``path`` is left as it was.
    Without ``force`` an existing non-empty ``path`` is an error (checked before and at commit).
    """
    shown = Path(path)
    final = real_output(path)
    if os.path.lexists(final) and not final.is_dir() and not force:
        raise InputError(f"{shown}: exists and is not a directory (use --force to replace it)")
    if final.exists() and _non_empty(final) and not force:
        raise _exists(shown, final)
    _mkdirs(final.parent, shown)
    tmp = temp_name(final)
    try:
        tmp.mkdir(mode=_umask_mode(0o777))
    except OSError as exc:
        raise InputError(f"{shown}: cannot create output directory ({exc.strerror})") from None
    with _undo_on_failure(shown, [tmp]):
        yield tmp
        pause_point("written")
        _fsync_tree(tmp)
        _commit(tmp, final, shown, force)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary file name beside ``path``; fsynced and renamed onto ``path`` only on success."""
    shown, final = _file_output(path, force, "a file")
    tmp = temp_name(final)
    with _undo_on_failure(shown, [tmp]):
        yield tmp
        if not tmp.exists():
            raise InputError(f"{shown}: nothing was written")
        _fsync_path(tmp)
        tmp.chmod(_umask_mode(0o666))
        _commit(tmp, final, shown, force)


@contextlib.contextmanager
def atomic_model_file(path: str | os.PathLike, force: bool = False,
                      protect: Iterable[str | os.PathLike] = ()) -> Iterator[tuple[Path, str]]:
    """Commit a ``.onnx`` file with its weights: yields (temporary graph path, data file name).

    The caller writes the graph to the yielded path and its weights to the data file name beside it.
    At commit the data file (unique name) moves beside ``path`` first, then the graph's rename makes
    both visible at once; the data files of the replaced graph are removed afterwards, except any in
    ``protect`` (inputs). A kill at any point leaves the old pair or the new pair, never a mix.
    """
    shown, final = _file_output(path, force, "a .onnx file")
    stem = final.name[:-5] if final.name.endswith(".onnx") else final.name
    data_name = f"{stem}.{secrets.token_hex(4)}.onnx_data"
    tmpdir = temp_name(final)
    try:
        tmpdir.mkdir()
    except OSError as exc:
        raise InputError(f"{shown}: cannot create a temporary folder beside it ({exc.strerror})") from None
    keep = {real_output(p) for p in protect}
    undo = [tmpdir]
    with _undo_on_failure(shown, undo):
        yield tmpdir / final.name, data_name
        pause_point("written")
        _fsync_tree(tmpdir)
        graph = tmpdir / final.name
        data = tmpdir / data_name
        with _folder_lock(final.parent):
            clean_stale(final.parent)
            if final.exists() and _non_empty(final) and not force:
                raise _exists(shown, final)
            old_data = [f for f in _data_files_of(final) if f.parent == final.parent and _owned_data(f.name, stem)]
            if data.exists():
                undo.append(final.parent / data_name)
                os.rename(data, undo[-1])
            pause_point("commit")
            os.replace(graph, final)
            del undo[1:]  # committed: the data file is the output's now
            _committed(final)
            for f in old_data:
                if f not in keep and f.name != data_name:
                    with contextlib.suppress(OSError):
                        f.unlink()
        _remove(tmpdir)


def _owned_data(name: str, stem: str) -> bool:
    """Data files sdgraph writes for ``<stem>.onnx``: ``<stem>.<8 hex>.onnx_data`` or ``<stem>.onnx_data``."""
    return name == f"{stem}.onnx_data" or re.fullmatch(re.escape(stem) + r"\.[0-9a-f]{8}\.onnx_data", name) is not None
