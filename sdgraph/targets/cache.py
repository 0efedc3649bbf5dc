"""Content-keyed cache of built submodel artifacts under ``$SDGRAPH_CACHE_DIR`` that says why it missed."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

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
    env = os.environ.get("SDGRAPH_CACHE_MAX_GB", "").strip().lower()
    if env in ("0", "none", "unlimited"):
        return None
    try:
        gb = float(env) if env else DEFAULT_MAX_GB
    except ValueError:
        log.warning("SDGRAPH_CACHE_MAX_GB=%r is not a number; using %s", env, DEFAULT_MAX_GB)
        gb = DEFAULT_MAX_GB
    return int(gb * 1e9) if gb > 0 else None


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def graph_hash(files: list[Path], root: Path | None = None) -> str:
    """sha256 over a graph file and its external-data files (in the order given).

    Hashing 3.4 GB takes seconds, so the result is memoized by (path, size, mtime) in the cache.
    """
    files = [Path(p).resolve() for p in files]
    stamp = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    memo_dir = (root or cache_dir()) / "hashes"
    memo = memo_dir / (_digest(stamp)[:32] + ".txt")
    if memo.is_file():
        return memo.read_text().strip()
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while block := f.read(16 << 20):
                h.update(block)
    value = h.hexdigest()
    try:
        memo_dir.mkdir(parents=True, exist_ok=True)
        memo.write_text(value)
    except OSError:  # a read-only cache still works, just slower
        pass
    return value


def make_key(components: Mapping[str, Any]) -> str:
    return _digest({k: components[k] for k in COMPONENTS})[:40]


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_tree(src: Path, dst: Path) -> None:
    """Hard-link (or copy) every file of ``src`` into ``dst``: a 3.4 GB artifact costs no space twice."""
    for p in sorted(src.rglob("*")):
        if p.is_file():
            _link_or_copy(p, dst / p.relative_to(src))


class ArtifactCache:
    """Built submodel folders stored as ``<root>/<target>/<key>/{files..., entry.json}``.

    ``entry.json`` holds the key's components, so a miss can be explained by comparing against the
    closest earlier entry for the same submodel (same source path or same role). Its mtime is the
    entry's last use: after each store, the least recently used entries are evicted until the cache
    holds at most ``max_bytes`` (files hard-linked into artifacts count too: they are the cache's
    as soon as the artifact is deleted).
    """

    def __init__(self, root: Path | None = None, max_bytes: int | None = None):
        self.root = Path(root) if root else cache_dir()
        self.max_bytes = max_bytes  # None: unbounded; the driver passes cache_max_bytes()

    def lookup(self, target: str, components: Mapping[str, Any]) -> tuple[Path | None, str]:
        """Return (entry folder, "") on a hit, (None, reason) on a miss."""
        key = make_key(components)
        folder = self.root / target / key
        meta = folder / "entry.json"
        if meta.is_file() and (folder / "files").is_dir():
            try:
                json.loads(meta.read_text())
                _touch(meta)
                return folder, ""
            except ValueError:
                log.warning("cache entry %s is unreadable; rebuilding", folder)
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
        """Copy a freshly built submodel folder into the cache (atomically); failures only warn."""
        key = make_key(components)
        folder = self.root / target / key
        try:
            (self.root / target).mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=self.root / target))
            copy_tree(built, tmp / "files")
            (tmp / "entry.json").write_text(json.dumps(
                {"components": dict(components), "entry": dict(entry), "created": time.time()}, indent=2, default=str))
            if folder.exists():
                shutil.rmtree(folder, ignore_errors=True)
            os.rename(tmp, folder)
        except OSError as exc:
            log.warning("could not store %s in the cache at %s: %s", target, self.root, exc)
            return None
        if self.max_bytes is not None:
            self.prune(self.max_bytes, keep=folder)
        return folder

    def _scan(self) -> list[tuple[Path, float, dict[tuple[int, int], int]]]:
        """(folder, last use, {inode: bytes} of its files) per complete entry, least recently used first."""
        out = []
        for meta in self.root.glob("*/*/entry.json"):
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

    def restore(self, folder: Path, dst: Path) -> dict[str, Any]:
        copy_tree(folder / "files", dst)
        return json.loads((folder / "entry.json").read_text())["entry"]


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
    """Bytes of several trees' files, a file hard-linked into more than one counted once."""
    union: dict[tuple[int, int], int] = {}
    for files in trees:
        union.update(files)
    return sum(union.values())


def _short(v: Any, n: int = 60) -> str:
    s = json.dumps(v, sort_keys=True, default=str) if not isinstance(v, str) else v
    return s if len(s) <= n else s[: n - 3] + "..."
