"""sdgraph calib-data: calibration inputs from a model directory, written as one .npz for qdq{calib_data=...}."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sdgraph.cli._app import command, console
from sdgraph.errors import InputError, UsageError
from sdgraph.ir.model import ROLES

__all__ = ["calib_data"]


@command("calib-data")
def calib_data(
    model_dir: Path = typer.Argument(..., help="An exported model directory (tokenizer, text encoder, scheduler, submodels)"),
    out: Path = typer.Option(..., "--out", "-o", help="The .npz to write (arrays named as the submodel's inputs, leading axis = samples)"),
    samples: int = typer.Option(16, "--samples", "-n", help="Number of samples"),
    role: str = typer.Option("unet", "--role", help=f"Submodel whose inputs to make: {', '.join(ROLES)}"),
    steps: int = typer.Option(8, "--steps", help="Scheduler steps per calibration trajectory (UNet, VAE decoder)"),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Prompts, one a line (default: sdgraph's list)"),
    holdout: bool = typer.Option(False, "--holdout", help="Draw from the held-back prompts and noise instead"),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file"),
) -> None:
    """Write calibration inputs made by a model directory's own text encoder, scheduler and UNet.

    The file feeds `qdq{calib_data=FILE.npz}` on a copy of the submodel that has no folder around it.
    """
    from sdgraph.ir.outputs import guard_output
    from sdgraph.ir.model import Model
    from sdgraph.ir.modeldir import ModelDir
    from sdgraph.quant.calib_file import save_calib_data
    from sdgraph.quant.calibration import calibration_feeds

    if role not in ROLES:
        raise UsageError(f"--role must be one of {', '.join(ROLES)}, got {role!r}")
    if samples < 1 or steps < 1:
        raise UsageError("--samples and --steps need a value >= 1")
    src = ModelDir(model_dir).model_path(role)
    if not model_dir.is_dir():
        raise InputError(f"{model_dir}: not a directory (calib-data needs an exported model directory)")
    if not src.is_file():
        raise InputError(f"{src}: missing (is it an exported model directory with a {role}?)")
    if out.suffix != ".npz":
        raise UsageError(f"{out}: the output must end in .npz")
    guard_output(out, [model_dir] + ([prompt_file] if prompt_file else []), force=force)
    model = Model.load(src)
    feeds = calibration_feeds(model, samples, prompt_file=str(prompt_file) if prompt_file else None, steps=steps,
                              holdout=holdout)
    save_calib_data(out, feeds, force=force)
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in feeds[0].items())
    console.print(f"wrote {out}: {len(feeds)} samples for {role} ({shapes} each)", markup=False, soft_wrap=True)
