"""Content-keyed cache of built submodel artifacts under ``$SDGRAPH_CACHE_DIR`` that says why it missed."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

__all__ = ["cache_dir", "graph_hash", "make_key", "ArtifactCache", "COMPONENTS"]

log = logging.getLogger(__name__)

# The parts of a key, in the order a miss names them.
COMPONENTS = ("graph", "pipeline", "target", "options", "precision", "shapes", "tools")


def cache_dir() -> Path:
    env = os.environ.get("SDGRAPH_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "sdgraph"


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
    closest earlier entry for the same submodel (same source path or same role).
    """

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else cache_dir()

    def lookup(self, target: str, components: Mapping[str, Any]) -> tuple[Path | None, str]:
        """Return (entry folder, "") on a hit, (None, reason) on a miss."""
        key = make_key(components)
        folder = self.root / target / key
        meta = folder / "entry.json"
        if meta.is_file() and (folder / "files").is_dir():
            try:
                json.loads(meta.read_text())
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
            return folder
        except OSError as exc:
            log.warning("could not store %s in the cache at %s: %s", target, self.root, exc)
            return None

    def restore(self, folder: Path, dst: Path) -> dict[str, Any]:
        copy_tree(folder / "files", dst)
        return json.loads((folder / "entry.json").read_text())["entry"]


def _short(v: Any, n: int = 60) -> str:
    s = json.dumps(v, sort_keys=True, default=str) if not isinstance(v, str) else v
    return s if len(s) <= n else s[: n - 3] + "..."
