"""Content-keyed cache of built submodel artifacts under ``$SDGRAPH_CACHE_DIR`` that says why it missed."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import contextlib
import fcntl
import stat
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from sdgraph.errors import SdgraphError

from sdgraph.paths import cache_dir

__all__ = ["cache_dir", "cache_max_bytes", "graph_hash", "make_key", "ArtifactCache", "COMPONENTS", "DEFAULT_MAX_GB"]

log = logging.getLogger(__name__)

# The parts of a key, in the order a miss names them.
COMPONENTS = ("graph", "pipeline", "target", "options", "precision", "shapes", "tools")


# A lowered full-size SD1.5 pipeline is about 8 GB per target: keep a few, then evict the least
# recently used entries.
DEFAULT_MAX_GB = 40.0


def cache_max_bytes() -> int | None:
    """``$SDGRAPH_CACHE_MAX_GB`` (default 40; 0 or ``none``: unbounded) as bytes."""
    from sdgraph.limits import check

    env = os.environ.get("SDGRAPH_CACHE_MAX_GB", "").strip().lower()
    if env in ("0", "none", "unlimited"):
        return None
    gb = float(check("SDGRAPH_CACHE_MAX_GB", env)) if env else DEFAULT_MAX_GB  # NaN, inf, junk: exit 2
    return int(gb * 1e9) if gb > 0 else None


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _stamp(p: Path) -> list:
    st = p.stat()
    return [str(p), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def _sample_digest(p: Path, block: int = 1 << 16, samples: int = 16) -> str:
    """blake2b over a few spread blocks of the file: a cheap check that a memoized hash is still right."""
    h = hashlib.blake2b(digest_size=16)
    size = p.stat().st_size
    with open(p, "rb") as f:
        for i in range(samples + 1):
            f.seek(max(0, min(size - block, (size - block) * i // samples)) if size > block else 0)
            h.update(f.read(block))
    return h.hexdigest()


def graph_hash(files: list[Path], root: Path | None = None) -> str:
    """sha256 over a graph file and its external-data files (in the order given).

    Hashing 3.4 GB takes seconds, so the result is memoized under (path, size, mtime, inode, ctime)
    together with a sampled content digest that is re-checked on every use: an edit that keeps the
    size and restores the mtime still changes the ctime, and a memo whose samples differ is rehashed.
    """
    files = [Path(p).resolve() for p in files]
    stamp = [_stamp(p) for p in files]
    samples = [_sample_digest(p) for p in files]
    memo_dir = (root or cache_dir()) / "hashes"
    memo = memo_dir / (_digest(stamp)[:32] + ".json")
    try:
        data = json.loads(memo.read_text())
        if data.get("samples") == samples and isinstance(data.get("sha256"), str):
            return data["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while block := f.read(16 << 20):
                h.update(block)
    value = h.hexdigest()
    try:
        memo_dir.mkdir(parents=True, exist_ok=True)
        from sdgraph.ir.outputs import atomic_file

        with atomic_file(memo, force=True) as tmp:
            tmp.write_text(json.dumps({"sha256": value, "samples": samples}))
    except (OSError, SdgraphError):  # a read-only cache still works, just slower
        pass
    return value


def make_key(components: Mapping[str, Any]) -> str:
    return _digest({k: components[k] for k in COMPONENTS})[:40]


def file_digest(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    return h.hexdigest()


_FICLONE = 0x40049409  # linux/fs.h: share the source's extents (btrfs, xfs, bcachefs ...)


def clone_file(src: Path, dst: Path) -> None:
    """Copy one file as its own inode: a reflink (copy-on-write) where the filesystem has them, else
    an in-kernel copy. Never a hard link: editing the copy never edits the source.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        try:
            fcntl.ioctl(fo.fileno(), _FICLONE, fi.fileno())
            cloned = True
        except OSError:
            cloned = False
    if not cloned:
        shutil.copyfile(src, dst)  # sendfile on Linux
    shutil.copystat(src, dst)


def copy_tree(src: Path, dst: Path) -> dict[str, str]:
    """Copy every regular file of ``src`` into ``dst`` (``clone_file``); returns {relative path: sha256}."""
    digests = {}
    for p in sorted(src.rglob("*")):
        if p.is_file() and not p.is_symlink():
            rel = p.relative_to(src)
            clone_file(p, dst / rel)
            digests[rel.as_posix()] = file_digest(dst / rel)
    return digests


class ArtifactCache:
    """Built submodel folders stored as ``<root>/<target>/<key>/{files..., entry.json}``.

    ``entry.json`` holds the key's components, so a miss can be explained by comparing against the
    closest earlier entry for the same submodel (same source path or same role), and the sha256 of
    every file, checked on every hit (a mismatch evicts the entry). Its mtime is the entry's last
    use: after each store, the least recently used entries are evicted until the cache holds at most
    ``max_bytes``. Artifacts get copies (reflinks where the filesystem has them), never hard links.
    ``lock`` serializes processes building the same key.
    """

    def __init__(self, root: Path | None = None, max_bytes: int | None = None):
        self.root = Path(root) if root else cache_dir()
        self.max_bytes = max_bytes  # None: unbounded; the driver passes cache_max_bytes()

    def usable(self) -> bool:
        """Whether entries can be stored here; says once (a warning) when not, and lowering goes on uncached."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            return True
        except OSError as exc:
            log.warning("the cache folder %s is not writable (%s); lowering without the cache", self.root,
                        exc.strerror or exc)
            return False

    @contextlib.contextmanager
    def lock(self, target: str, components: Mapping[str, Any]) -> Iterator[None]:
        """An exclusive ``flock`` on ``<root>/<target>/.<key>.lock`` while a key is looked up and built."""
        folder = self.root / target
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / f".{make_key(components)}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def lookup(self, target: str, components: Mapping[str, Any], *, peek: bool = False) -> tuple[Path | None, str]:
        """Return (entry folder, "") on a hit, (None, reason) on a miss.

        ``peek`` (``--dry-run``) changes nothing: a hit is not counted as a use, a bad entry is not evicted.
        """
        key = make_key(components)
        folder = self.root / target / key
        meta = folder / "entry.json"
        if meta.is_file() and (folder / "files").is_dir():
            try:
                json.loads(meta.read_text())
                if not peek:
                    _touch(meta)
                return folder, ""
            except ValueError:
                if peek:
                    return None, "entry unreadable (a real run evicts and rebuilds it)"
                log.warning("cache entry %s is unreadable; evicted, rebuilding", folder)
                self.evict(folder)
                return None, "entry unreadable (evicted)"
        return None, self.explain(target, components)

    def explain(self, target: str, components: Mapping[str, Any]) -> str:
        best, best_diff = None, None
        base = self.root / target
        if base.is_dir():
            for meta in base.glob("*/entry.json"):
                try:
                    data = json.loads(meta.read_text())
                except (OSError, ValueError):
                    continue
                old = data.get("components", {})
                if old.get("source") != components.get("source") and old.get("role") != components.get("role"):
                    continue
                diff = [k for k in COMPONENTS if old.get(k) != components.get(k)]
                if best_diff is None or len(diff) < len(best_diff) or (
                        len(diff) == len(best_diff) and data.get("created", 0) > best.get("created", 0)):
                    best, best_diff = data, diff
        if best is None:
            return "no earlier build of this submodel for this target"
        if not best_diff:
            return "entry incomplete"
        parts = []
        for k in best_diff:
            old, new = best["components"].get(k), components.get(k)
            if k == "graph":
                parts.append(f"graph changed (hash {str(old)[:12]} -> {str(new)[:12]})")
            elif k == "tools":
                changed = sorted(n for n in set(old or {}) | set(new or {}) if (old or {}).get(n) != (new or {}).get(n))
                parts.append("tool versions changed (" + ", ".join(
                    f"{n} {(old or {}).get(n)} -> {(new or {}).get(n)}" for n in changed) + ")")
            elif isinstance(old, dict) and isinstance(new, dict):
                changed = sorted(n for n in set(old) | set(new) if old.get(n) != new.get(n))
                parts.append(f"{k} changed (" + ", ".join(f"{n} {_short(old.get(n))} -> {_short(new.get(n))}" for n in changed) + ")")
            else:
                parts.append(f"{k} changed ({_short(old)} -> {_short(new)})")
        return "; ".join(parts)

    def store(self, target: str, components: Mapping[str, Any], built: Path, entry: Mapping[str, Any]) -> Path | None:
        """Copy a freshly built submodel folder into the cache (one commit); failures only warn."""
        from sdgraph.ir.outputs import atomic_dir

        key = make_key(components)
        folder = self.root / target / key
        try:
            with atomic_dir(folder, force=True) as tmp:
                digests = copy_tree(built, tmp / "files")
                (tmp / "entry.json").write_text(json.dumps(
                    {"components": dict(components), "entry": dict(entry), "digests": digests, "created": time.time()},
                    indent=2, default=str))
        except (OSError, SdgraphError) as exc:
            log.warning("could not store %s in the cache at %s: %s", target, self.root, exc)
            return None
        if self.max_bytes is not None:
            self.prune(self.max_bytes, keep=folder)
        return folder

    def evict(self, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)

    def _scan(self) -> list[tuple[Path, float, dict[tuple[int, int], int]]]:
        """(folder, last use, {inode: bytes} of its files) per complete entry, least recently used first."""
        out = []
        for meta in self.root.glob("*/*/entry.json"):
            if meta.parent.name.startswith("."):  # an entry being written
                continue
            try:
                used = meta.stat().st_mtime
            except OSError:
                continue
            out.append((meta.parent, used, _tree_files(meta.parent)))
        return sorted(out, key=lambda e: e[1])

    def entries(self) -> list[tuple[Path, float, int]]:
        """(folder, last use, bytes of its files) for every complete entry, least recently used first."""
        return [(folder, used, sum(files.values())) for folder, used, files in self._scan()]

    def size(self) -> int:
        """Bytes of all entries, each hard-linked file counted once."""
        return _union_bytes(files for _, _, files in self._scan())

    def prune(self, max_bytes: int, keep: Path | None = None) -> list[Path]:
        """Evict least recently used entries until the cache holds at most ``max_bytes``; returns them."""
        scan = self._scan()
        total = _union_bytes(files for _, _, files in scan)
        evicted = []
        for folder, _, files in scan:
            if total <= max_bytes:
                break
            if keep is not None and folder == keep:
                continue
            nbytes = sum(files.values())
            shutil.rmtree(folder, ignore_errors=True)
            total -= nbytes
            evicted.append(folder)
            log.info("cache: evicted %s (%.1f MB)", folder, nbytes / 1e6)
        return evicted

    def clear(self) -> int:
        """Remove every entry (and the hash memo); returns the number of entries removed."""
        entries = self.entries()
        for folder, _, _ in entries:
            shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(self.root / "hashes", ignore_errors=True)
        return len(entries)

    def restore(self, folder: Path, dst: Path) -> dict[str, Any] | None:
        """Copy an entry's files into ``dst`` and check each copy against the digest recorded at store.

        Returns the entry, or None when the entry is corrupt (a file missing, changed or added, or no
        digests recorded): then the entry is evicted, ``dst`` emptied, and one warning says so.
        """
        try:
            data = json.loads((folder / "entry.json").read_text())
            want = data.get("digests")
            got = copy_tree(folder / "files", dst)
        except (OSError, ValueError) as exc:
            want, got, data = None, {}, {"why": str(exc)}
        if not isinstance(want, dict) or got != want:
            bad = sorted(k for k in set(got) | set(want or {}) if got.get(k) != (want or {}).get(k))
            why = "no digests recorded" if not isinstance(want, dict) else f"{', '.join(bad[:3])} changed"
            log.warning("cache entry %s/%s is corrupt (%s); evicted, rebuilding", folder.parent.name, folder.name[:12], why)
            self.evict(folder)
            for p in list(dst.iterdir()):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            return None
        return data["entry"]


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:  # a read-only cache still serves hits
        pass


def _tree_files(folder: Path) -> dict[tuple[int, int], int]:
    """{(device, inode): bytes} of the regular files under ``folder``."""
    files = {}
    for p in folder.rglob("*"):
        try:
            st = p.lstat()
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            files[(st.st_dev, st.st_ino)] = st.st_size
    return files


def _union_bytes(trees) -> int:
    """Bytes of several trees' files, a file hard-linked into more than one (older caches) counted once."""
    union: dict[tuple[int, int], int] = {}
    for files in trees:
        union.update(files)
    return sum(union.values())


def _short(v: Any, n: int = 60) -> str:
    s = json.dumps(v, sort_keys=True, default=str) if not isinstance(v, str) else v
    return s if len(s) <= n else s[: n - 3] + "..."
