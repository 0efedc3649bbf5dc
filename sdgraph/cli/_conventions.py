"""What every command shares: ``--version``, ``-v``/``-q``, and records printed as a table or, when the
terminal is too narrow for the table, one block per record (nothing cut with an ellipsis).
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Sequence

import typer
from rich.measure import Measurement
from rich.table import Table

from sdgraph.cli._app import app, console, err_console

__all__ = ["print_records", "print_json", "plain_json", "parse_seeds"]


def _version(value: bool) -> None:
    if value:
        from sdgraph import __version__

        typer.echo(f"sdgraph {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit"),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More log lines (-v info, -vv debug)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors and the requested output (JSON, files)"),
) -> None:
    """One compiler for Stable Diffusion graphs: export, optimize, lower, run, bench, verify."""
    if verbose:
        logging.getLogger().setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
        logging.getLogger("sdgraph").setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    console.quiet = quiet  # set on every invocation: an in-process caller (tests, the API) runs many
    err_console.quiet = False  # errors are always said


def print_records(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *,
                  as_json: bool = False) -> None:
    """Rows as a table when it fits the terminal, else one block per row; ``as_json`` prints a JSON list.

    The JSON has one object per row, keyed by the column names in snake case (the documented ``--json``
    schema of ``targets`` and ``doctor``).
    """
    if as_json:
        keys = [c.replace(" ", "_") for c in columns]
        print_json([dict(zip(keys, row)) for row in rows])
        return
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*(_text(v) for v in row))
    natural = Measurement.get(console, console.options.update(width=100_000, max_width=100_000), table).maximum
    if natural <= console.width:
        console.print(table)
        return
    console.print(f"[bold]{title}[/bold]")
    for row in rows:
        console.print(f"[bold]{_text(row[0])}[/bold]", markup=True, highlight=False)
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True, style="dim")
        grid.add_column(overflow="fold")
        for col, v in zip(columns[1:], row[1:]):
            grid.add_row(f"  {col}:", _text(v))
        console.print(grid)


def print_json(data: Any) -> None:
    """``data`` as one strict JSON document on stdout, printed even with ``-q`` (the ``--json`` of every command).

    Paths and other objects become strings; infinite and NaN numbers (the PSNR of identical images)
    the strings ``"inf"``, ``"-inf"`` and ``"nan"``, so any JSON parser reads the output.
    """
    typer.echo(json.dumps(plain_json(data), indent=2, allow_nan=False))


def plain_json(x: Any) -> Any:
    """``x`` with only JSON types: dicts (string keys), lists, str, int, finite float, bool, None."""
    if isinstance(x, dict):
        return {str(k): plain_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [plain_json(v) for v in x]
    if x is None or isinstance(x, (str, bool, int)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else ("nan" if math.isnan(x) else ("inf" if x > 0 else "-inf"))
    if hasattr(x, "tolist") and hasattr(x, "dtype"):  # numpy scalars and arrays
        return plain_json(x.tolist())
    return str(x)


def _text(v: Any) -> str:
    from rich.markup import escape

    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v))
    return escape("" if v is None else str(v))


def parse_seeds(seeds: str) -> list[int]:
    """``--seeds 0,1,2`` -> ``[0, 1, 2]``, each within the ``--seed`` bound (verify, tune)."""
    from sdgraph.errors import UsageError
    from sdgraph.limits import check

    try:
        out = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds {seeds!r}: expected comma-separated integers") from None
    if not out:
        raise UsageError(f"--seeds {seeds!r}: give at least one seed")
    for s in out:
        check("--seed", s)
    return out
