"""Pass plugins: ``--plugin my_passes.py`` files and the ``sdgraph.passes`` entry-point group.

A plugin is ordinary Python that registers passes with ``@register``; loading it runs its code.
Import failures are one line (exit 2) naming the file or entry point.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from typing import Iterable

from sdgraph.errors import UsageError
from sdgraph.passes.base import ENTRY_POINT_GROUP, load_entry_points

__all__ = ["ENTRY_POINT_GROUP", "load_plugin_file", "load_plugins", "load_entry_points"]

_LOADED: dict[str, list[str]] = {}


def _why(exc: BaseException) -> str:
    from sdgraph.passes.base import plugin_error

    return plugin_error(exc)


def _registered_since(before: set[str]) -> list[str]:
    from sdgraph.passes.base import registry

    return sorted(set(registry()) - before)


def load_plugin_file(path: str | Path) -> list[str]:
    """Import a Python file of passes; returns the pass names it registered (once per file)."""
    from sdgraph.passes.base import registry

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--plugin {p}: no such file")
    if p.suffix != ".py":
        raise UsageError(f"--plugin {p}: expected a .py file")
    key = str(p.resolve())
    if key in _LOADED:
        return _LOADED[key]
    before = set(registry())
    name = f"sdgraph_plugin_{p.stem}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, p)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:  # the plugin's own code: any failure is the plugin's, said in one line
        sys.modules.pop(name, None)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise UsageError(f"--plugin {p}: cannot import it: {_why(exc)}") from None
    _LOADED[key] = _registered_since(before)
    return _LOADED[key]


def load_plugins(paths: Iterable[str | Path] | None) -> list[str]:
    """``--plugin`` files (repeatable), in order; the pass names they registered."""
    names: list[str] = []
    for path in paths or ():
        names += load_plugin_file(path)
    return names
