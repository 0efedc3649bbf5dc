"""Commands over the IR and passes: optimize, inspect, passes, doctor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from sdgraph.cli._app import command, console
from sdgraph.cli._conventions import print_json
from sdgraph.errors import InputError, UsageError
from sdgraph.limits import check_all

__all__ = ["optimize", "inspect", "passes", "doctor"]


def _parse_shapes(items: list[str] | None) -> dict[str, tuple[int, ...]] | None:
    """``--shape [SUBMODEL:]NAME=DIMS`` (repeatable) for the --verify inputs; the same syntax as `sdgraph lower`."""
    if not items:
        return None
    from sdgraph.shape_spec import parse_shape_spec

    shapes: dict[str, tuple[int, ...]] = {}
    for item in items:
        shapes.update(parse_shape_spec(item))
    return shapes


@command("optimize")
def optimize(
    src: Path = typer.Argument(..., help="A .onnx file, a folder with model.onnx, or a model directory"),
    passes_: str = typer.Option(..., "--passes", "-p", help="Pipeline text, e.g. 'fold,tome:5,fa' or a preset"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (or .onnx file); default beside SRC: "
                                       "unet.opt.onnx, or <dir>-opt/"),
    verify: bool = typer.Option(False, "--verify", help="Run before/after each pass in ONNX Runtime and compare"),
    strict: bool = typer.Option(False, "--strict", help="Fail when a pattern pass leaves expected regions unmatched"),
    debug: bool = typer.Option(False, "--debug", help="Pattern passes list near misses with reasons"),
    report_path: Optional[Path] = typer.Option(None, "--report", help="Write the report as JSON"),
    dump_dir: Optional[Path] = typer.Option(None, "--dump-dir", help="Write the graph after each pass (003_fa.onnx)"),
    print_after: Optional[List[str]] = typer.Option(None, "--print-after", help="Print the graph after this pass (repeatable; 'all')"),
    submodels: Optional[str] = typer.Option(None, "--submodels", help="Model directory: only these submodels (comma-separated)"),
    shape: Optional[List[str]] = typer.Option(None, "--shape", help="Input shape for --verify, [SUBMODEL:]NAME=2x4x64x64"),
    seed: int = typer.Option(0, "--seed", help="Seed of the --verify inputs"),
    force: bool = typer.Option(False, "--force", help="Replace existing non-empty outputs (-o, --report, --dump-dir)"),
    plugin: Optional[List[Path]] = typer.Option(None, "--plugin", help="Python file of passes to load first (repeatable; runs its code)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the inputs, pipeline and outputs, print the plan; run and write nothing"),
    as_json: bool = typer.Option(False, "--json", help="Print the report (or the --dry-run plan) as JSON"),
) -> None:
    """Run a pass pipeline on a model (or every submodel of a model directory)."""
    from sdgraph.ir.outputs import guard_output, model_inputs
    from sdgraph.passes.manager import DumpDir, PrintAfter, optimize_path
    from sdgraph.passes.plugins import load_plugins

    load_plugins(plugin)

    check_all(seed=seed)
    if not src.exists():
        raise InputError(f"{src}: no such file or directory")
    if out is None:
        from sdgraph.cli._paths import default_output

        out = default_output(src, "opt", force)
    inputs = model_inputs(src)
    guard_output(out, inputs, force=force)
    if report_path is not None:
        guard_output(report_path, inputs, force=force, what="report")
    if dry_run:
        _dry_run(src, passes_, out, submodels, verify, as_json)
        return
    instruments = []
    if dump_dir is not None:
        instruments.append(DumpDir(dump_dir, force=force, inputs=inputs))
    if print_after:
        names = [] if "all" in print_after else print_after
        instruments.append(PrintAfter(lambda text: console.print(text, markup=False), names))
    with console.status(f"optimizing {src} ...", spinner="dots"):
        reports = optimize_path(
            src, passes_, out,
            submodels=submodels.split(",") if submodels else None,
            verify=verify, strict=strict, debug=debug, seed=seed, shapes=_parse_shapes(shape),
            instruments=instruments, force=force,
        )
    if as_json:
        print_json({name: rep.to_dict() for name, rep in reports.items()})
    else:
        for name, rep in reports.items():
            _print_report(name, rep, debug)
        console.print(f"wrote {out}")
    if report_path is not None:
        from sdgraph.ir.io import atomic_file

        data = {name: rep.to_dict() for name, rep in reports.items()}
        with atomic_file(report_path, force=force) as tmp:
            tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")


def _dry_run(src: Path, passes_: str, out: Path, submodels: str | None, verify: bool, as_json: bool) -> None:
    """What ``optimize`` would do: the canonical pipeline, the submodels (each loaded and checked), the output."""
    from sdgraph.ir.model import Model
    from sdgraph.ir.modeldir import ModelDir
    from sdgraph.passes.pipeline import build_pipeline, format_pipeline

    passes = build_pipeline(passes_)
    if ModelDir.is_model_dir(src):
        mdir = ModelDir(src)
        files = {n: mdir.model_path(n) for n in mdir.select(submodels.split(",") if submodels else None)}
    else:
        if submodels:
            raise UsageError("--submodels applies to a model directory, not to a single model file")
        files = {src.stem if src.is_file() else src.name: src}
    subs = {}
    for name, f in files.items():
        m = Model.load(f)  # the same checks as a real run: a bad graph is refused here too
        subs[name] = {"file": str(f), "role": m.role, "nodes": m.num_nodes()}
    plan = {"src": str(src), "out": str(out), "pipeline": format_pipeline(passes), "verify": verify,
            "passes": [{"name": p.name, "spec": p.spec(), "exact": p.exact} for p in passes], "submodels": subs,
            "dry_run": True}
    if as_json:
        print_json(plan)
        return
    console.print(f"dry run: {src} -> {out}", markup=False)
    console.print(f"pipeline: {plan['pipeline']}" + ("  (each pass verified in ONNX Runtime)" if verify else ""),
                  markup=False)
    for name, sub in subs.items():
        console.print(f"  {name} ({sub['role']}): {sub['nodes']} nodes, {sub['file']}", markup=False)
    console.print(f"dry run: would write {out}; nothing was run or written", markup=False)


def _print_report(name: str, rep, debug: bool) -> None:
    table = Table(title=f"{name} ({rep.role}): {rep.pipeline}", title_justify="left")
    for col in ("#", "pass", "modified", "matched", "stats", "nodes", "ops changed", "error vs before", "s"):
        table.add_column(col, overflow="fold")
    for r in rep.records:
        if r.skipped:
            table.add_row(str(r.index), r.spec, "skipped", "", r.skipped, "", "", "", "")
            continue
        matched = f"{r.matched}/{r.expected}" if r.expected is not None else ""
        stats = " ".join(f"{k}={v}" for k, v in r.stats.items())
        delta = " ".join(f"{k}{v:+d}" for k, v in sorted(r.ops_delta.items(), key=lambda kv: kv[1]))
        nums = f"rel {r.numbers['max_rel']:.2e} cos {r.numbers['cosine']:.6f}" if r.numbers else ""
        table.add_row(str(r.index), r.spec, "yes" if r.modified else "no", matched, stats,
                      f"{r.nodes_before}→{r.nodes_after}", delta, nums, f"{r.seconds:.2f}")
    console.print(table)
    for r in rep.records:
        for note in r.notes:
            console.print(f"  {r.spec}: {note}", markup=False)
        if debug:
            for node, why in r.near_misses:
                console.print(f"  near miss in {r.spec}: {node}: {why}", markup=False)
    _print_histogram(rep.ops_before, rep.ops_after)
    if rep.numbers:
        console.print(f"  final vs input: max_abs {rep.numbers['max_abs']:.3e}  max_rel {rep.numbers['max_rel']:.3e}"
                      f"  cosine {rep.numbers['cosine']:.6f}")


def _print_histogram(before: dict, after: dict) -> None:
    table = Table(title="op counts", title_justify="left")
    table.add_column("op")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for op in sorted(set(before) | set(after), key=lambda o: (-max(before.get(o, 0), after.get(o, 0)), o)):
        b, a = before.get(op, 0), after.get(op, 0)
        table.add_row(op, str(b), str(a), style=None if a == b else "bold")
    table.add_row("total", str(sum(before.values())), str(sum(after.values())))
    console.print(table)


@command("inspect")
def inspect(
    src: Path = typer.Argument(..., help="A .onnx file or a folder with model.onnx"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables"),
) -> None:
    """Inputs/outputs, op histogram, parameters, role and attention-like regions of a model."""
    from sdgraph.ir.inspect import summarize

    info = summarize(src)
    if as_json:
        print_json(info)
        return
    console.print(f"[bold]{info['name']}[/bold]  role={info['role']}  opset={info['opset']}  nodes={info['nodes']}  "
                  f"parameters={info['parameters']:,}  bytes={info['bytes']:,}  attention-like regions={info['attention_regions']}")
    io_table = Table(title_justify="left")
    for col in ("", "name", "dtype", "shape"):
        io_table.add_column(col)
    for kind in ("inputs", "outputs"):
        for t in info[kind]:
            io_table.add_row(kind[:-1], t["name"], t["dtype"], str(t["shape"]))
    console.print(io_table)
    hist = Table(title="op histogram", title_justify="left")
    hist.add_column("op")
    hist.add_column("count", justify="right")
    for op, n in info["ops"].items():
        hist.add_row(op, str(n))
    console.print(hist)


@command("passes")
def passes(
    as_json: bool = typer.Option(False, "--json", help="Print the passes, their options and the presets as JSON"),
    plugin: Optional[List[Path]] = typer.Option(None, "--plugin", help="Python file of passes to load first (repeatable; runs its code)"),
) -> None:
    """Every registered pass with its summary and options, and the presets."""
    from rich.padding import Padding
    from rich.text import Text

    from sdgraph.passes.base import format_value, registry
    from sdgraph.passes.pipeline import PRESETS
    from sdgraph.passes.plugins import load_plugins

    load_plugins(plugin)

    if as_json:
        type_name = {list: "list", bool: "bool", int: "int", float: "float", str: "str"}
        data = {"passes": [{"name": name, "exact": cls.exact, "summary": cls.summary,
                            "options": [{"name": o.name, "type": type_name.get(o.type, str(o.type)),
                                         "default": format_value(o.default), "choices": list(o.choices or ()),
                                         "positional": bool(o.positional), "help": o.help} for o in cls.options]}
                           for name, cls in registry().items()],
                "presets": dict(PRESETS)}
        print_json(data)
        return
    for name, cls in registry().items():
        kind = "exact" if cls.exact else "approximate"
        console.print(f"[bold]{name}[/bold]  ({kind}) {escape(cls.summary)}")
        for opt in cls.options:
            pos = " (positional)" if opt.positional else ""
            head, _, rest = opt.describe().partition("  ")
            console.print(Padding(Text(f"{head}{pos}", overflow="fold"), (0, 0, 0, 4)))
            if rest.strip():
                console.print(Padding(Text(rest.strip(), style="dim"), (0, 0, 0, 8)))
    console.print("[bold]presets[/bold]")
    for name, text in PRESETS.items():
        console.print(f"    {name} = {text}", markup=False)


@command("doctor")
def doctor(as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON")) -> None:
    """Which optional parts and targets are usable here, and why not."""
    from sdgraph.cli._conventions import print_records
    from sdgraph.doctor import checks

    rows = [(name, bool(ok), detail) for name, ok, detail in checks()]
    print_records("sdgraph doctor", ("part", "usable", "detail"), rows, as_json=as_json)
