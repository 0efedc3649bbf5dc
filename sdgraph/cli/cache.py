"""sdgraph cache: what the lowering cache holds, and pruning or clearing it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from sdgraph.cli._app import command, console
from sdgraph.errors import UsageError
from sdgraph.limits import check_all

__all__ = ["cache"]


@command("cache")
def cache(
    prune: Optional[float] = typer.Option(None, "--prune", metavar="GB",
                                          help="Evict least recently used entries until the cache holds at most GB"),
    clear: bool = typer.Option(False, "--clear", help="Remove every entry"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Default: $SDGRAPH_CACHE_DIR or ~/.cache/sdgraph"),
) -> None:
    """List the lowering cache's entries (least recently used first), its size and its bound."""
    from sdgraph.targets.cache import ArtifactCache, cache_max_bytes

    store = ArtifactCache(cache_dir)
    if prune is not None and clear:
        raise UsageError("--prune and --clear exclude each other")
    check_all(prune=prune)
    if prune is not None:
        evicted = store.prune(int(prune * 1e9))
        console.print(f"evicted {len(evicted)} entr{'y' if len(evicted) == 1 else 'ies'}", markup=False)
    elif clear:
        console.print(f"removed {store.clear()} entries from {store.root}", markup=False)
    entries = store.entries()
    now = time.time()
    for folder, used, nbytes in entries:
        console.print(f"{folder.parent.name:10s} {folder.name[:12]}  {nbytes / 1e9:8.3f} GB  "
                      f"last used {(now - used) / 3600:7.1f} h ago", markup=False)
    bound = cache_max_bytes()
    console.print(f"{store.root}: {len(entries)} entries, {store.size() / 1e9:.3f} GB "
                  f"(bound {'none' if bound is None else f'{bound / 1e9:g} GB'}: $SDGRAPH_CACHE_MAX_GB)", markup=False)
