"""Commands that make model directories: ``sdgraph export`` and ``sdgraph demo-model``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.table import Table

from sdgraph.cli._app import command, console
from sdgraph.cli._conventions import print_json
from sdgraph.limits import check_all

__all__ = ["export_cmd", "demo_model_cmd"]


def _quiet_libraries() -> None:
    """diffusers/transformers draw their own tqdm bars on load and save; ours replace them.

    Set through the environment (read when they are imported), so a command that fails on its
    arguments never pays for importing torch.
    """
    for var, value in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                       ("DIFFUSERS_VERBOSITY", "error")):
        os.environ.setdefault(var, value)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def summary_table(manifest: dict) -> Table:
    """Per submodel: nodes, parameters, bytes, export seconds, worst error against torch."""
    table = Table(title=f"{manifest['family']} · {manifest['exporter']} exporter · opset {manifest['opset']}",
                  box=box.SIMPLE_HEAD)
    for col in ("submodel", "nodes", "params", "size", "export s", "max rel err", "cosine"):
        table.add_column(col, justify="left" if col == "submodel" else "right", no_wrap=True)
    for name, sub in manifest["submodels"].items():
        w = sub["parity"]["worst"]
        table.add_row(name, f"{sub['nodes']:,}", f"{sub['parameters']:,}", _human_bytes(sub["bytes"]),
                      f"{sub['export_seconds']:.1f}", f"{w['max_rel']:.1e}", f"{w['cosine']:.6f}")
    return table


@command("export")
def export_cmd(
    src: str = typer.Argument(..., help="A diffusers pipeline directory (or a hub id where a network exists)"),
    out: Path = typer.Option(..., "--out", "-o", help="Model directory to write"),
    exporter: str = typer.Option("legacy", "--exporter", help="legacy (TorchScript) | dynamo (needs onnxscript)"),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset (default 17 legacy, 18 dynamo)"),
    batch: int = typer.Option(1, "--batch", help="Batch size of every exported input"),
    height: Optional[int] = typer.Option(None, "--height", help="Image height in pixels (default: the UNet's sample size x VAE factor)"),
    width: Optional[int] = typer.Option(None, "--width", help="Image width in pixels"),
    dynamic: bool = typer.Option(False, "--dynamic/--static", help="Symbolic batch/height/width axes"),
    submodels: Optional[str] = typer.Option(None, "--submodels", help="Only these, comma-separated (text_encoder,unet,...)"),
    vae: Optional[str] = typer.Option(None, "--vae", help="Use this VAE (e.g. a TAESD AutoencoderTiny folder) instead of the pipeline's"),
    attention: str = typer.Option("sdpa", "--attention", help="sdpa (default) | classic (diffusers AttnProcessor; lets legacy export opset < 14)"),
    tolerance: float = typer.Option(1e-3, "--tolerance", help="Worst max_rel against torch before the export fails"),
    controlnet: Optional[Path] = typer.Option(None, "--controlnet", help="A diffusers ControlNetModel folder: export it and a UNet taking its residuals"),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory"),
    as_json: bool = typer.Option(False, "--json", help="Print the written manifest (sdgraph.json) as JSON on stdout"),
) -> None:
    """Export a diffusers pipeline to ONNX submodels, each checked against torch in ONNX Runtime."""
    check_all(batch=batch, opset=opset, height=height, width=width, tolerance=tolerance)
    _quiet_libraries()
    from sdgraph.export import export_pipeline

    manifest = export_pipeline(src, out, exporter=exporter, opset=opset, batch=batch, height=height, width=width,
                               dynamic=dynamic, submodels=submodels, vae=vae, force=force, attention=attention,
                               tolerance=tolerance, controlnet=controlnet)
    if as_json:
        print_json(manifest)
        return
    console.print(summary_table(manifest))
    console.print(f"wrote {out} ({manifest['family']}, prediction {manifest['prediction_type']}, "
                  f"{manifest['height']}x{manifest['width']}, batch {manifest['batch']}"
                  f"{', dynamic' if manifest['dynamic'] else ''})")


@command("demo-model")
def demo_model_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write the pipeline to"),
    arch: str = typer.Option("sd15", "--arch", help="sd15 | sd21 | sdxl | pix2pix | turbo (SDXL-Turbo: 1 step, trailing) | taesd (a VAE for --vae)"),
    size: str = typer.Option("tiny", "--size", help="tiny (tests, seconds) | full (real architecture sizes)"),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights"),
    controlnet: bool = typer.Option(False, "--controlnet", help="A ControlNet pipeline: adds a random-weight controlnet/ (sd15, sd21, sdxl, turbo)"),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory"),
) -> None:
    """Write a random-weight diffusers pipeline built from configs (nothing is downloaded)."""
    check_all(seed=seed)
    _quiet_libraries()
    from sdgraph.demo import build_demo_pipeline, build_demo_vae, check_demo_name

    check_demo_name(arch)
    with console.status(f"building {arch} ({size})"):
        if arch == "taesd":
            if controlnet:
                from sdgraph.errors import UsageError

                raise UsageError("--controlnet goes with a pipeline arch (sd15, sd21, sdxl, turbo), not taesd")
            build_demo_vae(out, "taesd", size, seed=seed, force=force)
        else:
            build_demo_pipeline(out, arch, size, seed=seed, force=force, controlnet=controlnet)
    console.print(f"wrote {out} ({arch}{' + ControlNet' if controlnet else ''}, {size}, random weights, seed {seed})")
