"""The typer app and the error wrapper every command uses: one line on stderr, an exit code."""

from __future__ import annotations

import errno
import functools
import logging
import os
from typing import Any, Callable

import typer
from rich.console import Console

from sdgraph import progress
from sdgraph.errors import SdgraphError

__all__ = ["app", "command", "console", "err_console", "fail", "run_app"]

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


# OSErrors that describe the user's files or machine (exit 2), not a bug in sdgraph.
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR,
                errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP, errno.EFBIG, errno.EIO, errno.EXDEV, errno.ENOTEMPTY,
                errno.EEXIST, errno.EMFILE, errno.ENFILE, errno.ENXIO}


def run_app(prog_name: str = "sdgraph", args: list[str] | None = None) -> int:
    """Run the app; usage errors (unknown option, missing or bad argument) as one ``error:`` line.

    click prints usage errors as a box with the usage text; running it with
    ``standalone_mode=False`` hands them to us instead. ``--help`` and ``typer.Exit`` keep working.
    """
    try:  # typer >= 0.17 vendors its own click
        from typer._click import exceptions as ce
        from typer._click import echo
    except ImportError:  # pragma: no cover - older typer over plain click
        from click import echo
        from click import exceptions as ce

    _ABORT = tuple(c for c in (getattr(ce, "Abort", None),) if c is not None)
    cmd = typer.main.get_command(app)
    try:
        rv = cmd.main(args=args, prog_name=prog_name, standalone_mode=False)
    except ce.NoArgsIsHelpError as exc:
        echo(exc.ctx.get_help() if exc.ctx else "")
        return 2  # as click does: no command is a usage error, answered with the help
    except ce.UsageError as exc:
        hint = ""
        if exc.ctx is not None and exc.ctx.command_path:
            hint = f" (see '{exc.ctx.command_path} --help')"
        err_console.print(f"error: {exc.format_message()}{hint}".replace("\n", " "), markup=False, soft_wrap=True)
        return 2
    except (KeyboardInterrupt, *_ABORT):  # typer's vendored click has no Abort: Ctrl-C arrives as itself
        err_console.print("error: interrupted", markup=False)
        return 130
    except ce.ClickException as exc:  # e.g. a FileError from a click type
        err_console.print(f"error: {exc.format_message()}".replace("\n", " "), markup=False, soft_wrap=True)
        return 2
    return rv if isinstance(rv, int) else 0


def command(*args: Any, **kwargs: Any) -> Callable:
    """``@app.command`` that turns SdgraphError (and stray exceptions) into one line + exit code.

    Set SDGRAPH_DEBUG=1 to see tracebacks of unexpected errors. Long steps draw progress bars on stderr
    when it is a terminal, unless ``-q`` or the command's ``--json`` (``as_json``) was given
    (``$SDGRAPH_PROGRESS``: ``sdgraph.progress.for_console``).
    """

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*a: Any, **kw: Any) -> Any:
            try:
                bars = progress.for_console(err_console, enabled=not console.quiet and not kw.get("as_json"))
                with progress.using(bars):
                    return fn(*a, **kw)
            except typer.Exit:
                raise
            except SdgraphError as exc:
                for line in getattr(exc, "problems", [])[:200]:
                    err_console.print(f"  {line}", markup=False, soft_wrap=True)
                fail(str(exc), exc.exit_code)
            except KeyboardInterrupt:
                fail("interrupted", 130)
            except OSError as exc:
                if exc.errno not in _USER_ERRNOS or os.environ.get("SDGRAPH_DEBUG"):
                    raise
                # the machine or the user's files, not a bug: disk full, permissions, a read-only place
                where = f"{exc.filename}: " if exc.filename else ""
                fail(f"{where}{exc.strerror or exc}", 2)
            except Exception as exc:  # last resort: never a traceback for the user
                if os.environ.get("SDGRAPH_DEBUG"):
                    raise
                logging.getLogger("sdgraph").debug("unexpected error", exc_info=True)
                fail(f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                     "(set SDGRAPH_DEBUG=1 for a traceback)", 70)

        return app.command(*args, **kwargs)(wrapper)

    return deco
