"""sdgraph cache: what the lowering cache holds, and pruning or clearing it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from sdgraph.cli._app import command, console
from sdgraph.cli._conventions import print_json, print_records
from sdgraph.errors import UsageError
from sdgraph.limits import check_all

__all__ = ["cache"]


@command("cache")
def cache(
    prune: Optional[float] = typer.Option(None, "--prune", metavar="GB",
                                          help="Evict least recently used entries until the cache holds at most GB"),
    clear: bool = typer.Option(False, "--clear", help="Remove every entry"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Default: $SDGRAPH_CACHE_DIR or ~/.cache/sdgraph"),
    as_json: bool = typer.Option(False, "--json", help="Print the entries, size and bound as JSON on stdout"),
) -> None:
    """List the lowering cache's entries (least recently used first), its size and its bound."""
    from sdgraph.targets.cache import ArtifactCache, cache_max_bytes

    store = ArtifactCache(cache_dir)
    if prune is not None and clear:
        raise UsageError("--prune and --clear exclude each other")
    check_all(prune=prune)
    evicted = removed = None
    if prune is not None:
        evicted = len(store.prune(int(prune * 1e9)))
        if not as_json:
            console.print(f"evicted {evicted} entr{'y' if evicted == 1 else 'ies'}", markup=False)
    elif clear:
        removed = store.clear()
        if not as_json:
            console.print(f"removed {removed} entries from {store.root}", markup=False)
    entries = store.entries()
    now, bound, size = time.time(), cache_max_bytes(), store.size()
    if as_json:
        print_json({"root": str(store.root), "entries": [
            {"target": folder.parent.name, "key": folder.name, "bytes": nbytes, "last_used": round(used, 3),
             "hours_since_use": round((now - used) / 3600, 3)} for folder, used, nbytes in entries],
            "count": len(entries), "bytes": size, "bound_bytes": bound, "evicted": evicted, "removed": removed})
        return
    if entries:
        print_records("lowering cache, least recently used first", ("target", "key", "GB", "last used, h ago"),
                      [(folder.parent.name, folder.name[:12], f"{nbytes / 1e9:.3f}", f"{(now - used) / 3600:.1f}")
                       for folder, used, nbytes in entries])
    console.print(f"{store.root}: {len(entries)} entries, {size / 1e9:.3f} GB "
                  f"(bound {'none' if bound is None else f'{bound / 1e9:g} GB'}: $SDGRAPH_CACHE_MAX_GB)", markup=False)
