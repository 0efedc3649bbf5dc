"""The typer app and the error wrapper every command uses: one line on stderr, an exit code."""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import typer
from rich.console import Console

from sdgraph.errors import SdgraphError

__all__ = ["app", "command", "console", "err_console", "fail"]

app = typer.Typer(
    name="sdgraph",
    help="One compiler for Stable Diffusion graphs: export, optimize, lower, run, bench, verify.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 2) -> None:
    err_console.print(f"error: {message}", markup=False, soft_wrap=True)
    raise typer.Exit(code)


def command(*args: Any, **kwargs: Any) -> Callable:
    """``@app.command`` that turns SdgraphError (and stray exceptions) into one line + exit code.

    Set SDGRAPH_DEBUG=1 to see tracebacks of unexpected errors.
    """

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*a: Any, **kw: Any) -> Any:
            import os

            try:
                return fn(*a, **kw)
            except typer.Exit:
                raise
            except SdgraphError as exc:
                for line in getattr(exc, "problems", [])[:200]:
                    err_console.print(f"  {line}", markup=False, soft_wrap=True)
                fail(str(exc), exc.exit_code)
            except KeyboardInterrupt:
                fail("interrupted", 130)
            except Exception as exc:  # last resort: never a traceback for the user
                if os.environ.get("SDGRAPH_DEBUG"):
                    raise
                logging.getLogger("sdgraph").debug("unexpected error", exc_info=True)
                fail(f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                     "(set SDGRAPH_DEBUG=1 for a traceback)", 70)

        return app.command(*args, **kwargs)(wrapper)

    return deco
