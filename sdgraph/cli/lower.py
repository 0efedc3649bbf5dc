"""Commands of the targets: ``sdgraph lower`` and ``sdgraph targets``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from sdgraph.cli._app import command, console, err_console
from sdgraph.cli._conventions import print_json
from sdgraph.errors import UsageError

__all__ = ["lower_cmd", "targets_cmd"]


def _parse_options(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        k, eq, v = item.partition("=")
        if not eq or not k:
            raise UsageError(f"--option {item!r}: expected KEY=VALUE (e.g. threads=2)")
        out[k.strip()] = v.strip()
    return out


@command("lower")
def lower_cmd(
    src: Optional[Path] = typer.Argument(None, help="A .onnx file, a folder with model.onnx, or a model directory "
                                          "(default: the model directory this is run in)"),
    target: str = typer.Option(..., "--target", "-t", help="Target name (see `sdgraph targets`)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Artifact folder to write (default: <src>-<target>/ beside SRC)"),
    precision: Optional[str] = typer.Option(
        None, "--precision",
        help="fp32 | bf16 | fp16 | int8 (what the target takes; default: each submodel's own, a QDQ graph int8)"),
    shape: Optional[List[str]] = typer.Option(None, "--shape", help="Shape bucket input [SUBMODEL:]NAME=DIMS (unet:sample=2x4x64x64); "
                                              "a repeated name starts a new bucket"),
    height: Optional[int] = typer.Option(None, "--height", help="Image height the shapes of a model dir are derived from"),
    width: Optional[int] = typer.Option(None, "--width", help="Image width the shapes of a model dir are derived from"),
    batch: Optional[int] = typer.Option(None, "--batch", help="Images per prompt (the UNet gets 2x for guidance)"),
    option: Optional[List[str]] = typer.Option(None, "--option", help="Target option KEY=VALUE (repeatable)"),
    submodels: Optional[str] = typer.Option(None, "--submodels", help="Model directory: only these submodels (comma-separated)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="Build even when the cache has this artifact"),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output folder"),
    plugin: Optional[List[Path]] = typer.Option(None, "--plugin", help="Python file of passes to load first (repeatable; runs its code)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check everything and print the plan and cache decision; write nothing"),
    as_json: bool = typer.Option(False, "--json", help="Print the result (or the --dry-run plan) as JSON"),
) -> None:
    """Lower a model (or every submodel of a model directory) to a target's artifact folder."""
    from sdgraph.cli._paths import default_output, default_source
    from sdgraph.passes.plugins import load_plugins
    from sdgraph.targets.driver import lower, parse_shape_args

    load_plugins(plugin)  # passes a target runs while legalizing (e.g. ort-contrib) may come from a plugin
    buckets = parse_shape_args(shape or [])
    src = default_source() if src is None else src
    out = default_output(src, target, force) if out is None and src.exists() else out
    res = lower(src, target, out, precision=precision, shapes=buckets or None, options=_parse_options(option),
                submodels=submodels.split(",") if submodels else None, cache=not no_cache, force=force,
                progress=lambda m: err_console.print(m, markup=False, style="dim"), height=height, width=width, batch=batch,
                dry_run=dry_run)
    if as_json:
        print_json({"src": str(src), "out": str(out), "target": target, "precision": res.precision,
                    "dry_run": res.dry_run, "seconds": round(res.seconds, 3), "submodels": res.submodels,
                    "files": {n: e.get("files", {}) for n, e in res.manifest.get("submodels", {}).items()}})
        return
    if dry_run:
        table = Table(title=f"dry run: {src} -> {target} ({res.precision})", title_justify="left")
        for col in ("submodel", "precision", "shapes", "cache"):
            table.add_column(col, overflow="fold")
        for name, plan in res.submodels.items():
            shapes = "; ".join(" ".join(f"{k}={'x'.join(map(str, v))}" for k, v in b.items()) for b in plan["shapes"])
            table.add_row(name, plan["precision"], shapes or "as exported", res.cache_line(name))
        console.print(table)
        console.print(f"dry run: would write {out}; nothing was built or written", markup=False)
        return
    table = Table(title=f"{src} -> {target} ({res.precision})", title_justify="left")
    for col in ("submodel", "precision", "cache", "s", "files"):
        table.add_column(col)
    for name, info in res.submodels.items():
        entry = res.manifest["submodels"][name]
        size = sum(entry.get("files", {}).values())
        table.add_row(name, entry.get("precision", res.precision), res.cache_line(name), f"{info['seconds']:.2f}",
                      f"{len(entry.get('files', {}))} ({size / 1e6:.1f} MB)")
    console.print(table)
    console.print(f"wrote {out} in {res.seconds:.1f} s")


@command("targets")
def targets_cmd(as_json: bool = typer.Option(False, "--json", help="Print the targets as JSON")) -> None:
    """List targets: what each accepts and whether it is usable here."""
    from sdgraph.cli._conventions import print_records
    from sdgraph.targets.base import targets

    rows = []
    for name, cls in targets().items():
        t = cls()
        ok, why = t.available()
        usable = "yes" if ok else f"no: {why}" + (f" (pip install 'sdgraph[{t.extra}]')" if t.extra else "")
        cap = t.capability
        rows.append((name, usable, list(cap.precisions), "static" if cap.static_shapes else "dynamic",
                     sorted(cap.canonical_ops) or ["inlined"], [o.name for o in t.options], t.summary))
    print_records("targets", ("target", "usable here", "precisions", "shapes", "canonical ops", "options", "summary"),
                  rows, as_json=as_json)
