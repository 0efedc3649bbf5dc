"""sdgraph's command line: a thin typer app; each ``sdgraph/cli/<name>.py`` adds its commands."""

from __future__ import annotations

import importlib
import pkgutil

from sdgraph.cli import _conventions  # noqa: F401  (--version, -v/-q on the app)
from sdgraph.cli._app import app, run_app

__all__ = ["app", "main"]


def _load_commands() -> None:
    import sdgraph.cli as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"sdgraph.cli.{info.name}")


def main() -> None:
    import logging
    import os
    import sys

    logging.basicConfig(level=os.environ.get("SDGRAPH_LOG", "WARNING").upper(), format="%(levelname)s %(name)s: %(message)s")
    _load_commands()
    sys.exit(run_app(prog_name="sdgraph"))


_load_commands()
