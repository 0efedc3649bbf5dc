"""``sdgraph report``: one self-contained HTML page from demo, verify, bench, optimize and tune outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import typer

from sdgraph.cli._app import command, console
from sdgraph.cli._conventions import print_json

__all__ = ["report"]


@command("report")
def report(
    inputs: List[Path] = typer.Argument(..., help="Demo/verify/bench/tune folders, model or artifact dirs, or their JSON files"),
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="The HTML file to write"),
    title: str = typer.Option("sdgraph report", "--title"),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file"),
    as_json: bool = typer.Option(False, "--json", help="Also print the report's data as JSON on stdout"),
) -> None:
    """Write one HTML file (images with a slider and a difference heatmap, error tables, pass reports, bench charts)."""
    from sdgraph.pipeline.report import write_report

    path, data = write_report(inputs, out, title=title, force=force)
    if as_json:
        slim = json.loads(json.dumps(data, default=str))
        for c in slim["comparisons"]:
            for im in c["images"]:
                for k in ("ref", "cand", "heat"):
                    im.pop(k, None)
        for b in slim["benches"]:
            b.pop("charts", None)
        for t in slim["tunes"]:
            t.pop("chart", None)
        print_json(slim)
    else:
        n_img = sum(len(c["images"]) for c in data["comparisons"])
        console.print(f"wrote {path}: {len(data['comparisons'])} comparison(s), {n_img} image(s), "
                      f"{len(data['passes'])} pass report(s), {len(data['benches'])} bench(es), "
                      f"{len(data['tunes'])} tune stud(y/ies)", markup=False)
