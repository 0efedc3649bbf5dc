"""``sdgraph refit``: LoRAs into (or out of) a lowered artifact's weights, without re-running passes or lowering."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from sdgraph.cli._app import command, console, err_console

__all__ = ["refit_cmd"]


@command("refit")
def refit_cmd(
    artifact: Path = typer.Argument(..., help="A lowered artifact folder (sdgraph lower)"),
    lora: Optional[List[str]] = typer.Option(None, "--lora", help="LoRA .safetensors to fold in, PATH[:SCALE] (repeatable; scale 1)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Artifact folder to write (default: <artifact>-lora/ beside it)"),
    remove: bool = typer.Option(False, "--remove", help="Take out the LoRAs applied before (restores the base weights exactly)"),
    strict: bool = typer.Option(False, "--strict", help="Fail on any LoRA module that matches no weight"),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output folder"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON"),
) -> None:
    """Fold LoRAs into a lowered artifact's weights (or remove them) without re-running passes or lowering."""
    from sdgraph.cli._paths import default_output
    from sdgraph.targets.refit import parse_lora_arg, refit

    loras = [parse_lora_arg(x) for x in lora or []]
    out = default_output(artifact, "lora", force) if out is None and artifact.exists() else out
    res = refit(artifact, loras, out if out is not None else artifact, remove=remove, strict=strict, force=force,
                progress=None if as_json else lambda m: err_console.print(m, markup=False, style="dim"))
    if as_json:
        from sdgraph.cli._conventions import print_json

        print_json({"artifact": str(artifact), "out": str(res.out), "target": res.target, "seconds": round(res.seconds, 3),
                    "applied": res.applied, "submodels": res.submodels})
        return
    table = Table(title=f"{artifact} -> {res.out} ({res.target})", title_justify="left")
    for col in ("submodel", "tensors", "matched", "unmatched", "s"):
        table.add_column(col)
    for name, r in res.submodels.items():
        table.add_row(name, str(r.get("tensors", 0)), str(r.get("matched", 0)), str(r.get("unmatched", 0)), f"{r.get('seconds', 0):.2f}")
    console.print(table)
    shown = ", ".join(f"{Path(a['file']).name}:{a['scale']:g}" for a in res.applied) or "none (base weights)"
    console.print(f"wrote {res.out} in {res.seconds:.1f} s; LoRAs applied: {shown}", markup=False)
