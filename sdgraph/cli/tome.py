"""sdgraph tome-estimate: FLOPs removed and expected speed-up of `tome` on a UNet, before applying it."""

from __future__ import annotations

from pathlib import Path

import typer

from sdgraph.cli._app import command, console
from sdgraph.cli._conventions import print_json
from sdgraph.errors import InputError
from sdgraph.limits import check_all

__all__ = ["tome_estimate"]


@command("tome-estimate")
def tome_estimate(
    src: Path = typer.Argument(..., help="A UNet .onnx file (or folder with model.onnx), static latent size"),
    blocks: int = typer.Option(0, "--blocks", "-n", help="Merge the first N transformer blocks (0: by --max-downsample)"),
    ratio: float = typer.Option(0.5, "--ratio", "-r", help="Fraction of tokens merged"),
    max_downsample: int = typer.Option(0, "--max-downsample", help="Merge blocks with at most this downsampling"),
    crossattn: bool = typer.Option(False, "--crossattn", help="Also merge around cross-attention"),
    mlp: bool = typer.Option(False, "--mlp", help="Also merge around the MLP"),
    as_json: bool = typer.Option(False, "--json", help="Print the estimate as JSON on stdout"),
) -> None:
    """FLOPs before/after `tome` at the graph's resolution and the FLOP-proportional speed-up."""
    from sdgraph.ir.model import Model
    from sdgraph.passes.tome import estimate

    check_all(ratio=ratio, blocks=blocks, max_downsample=max_downsample)
    if not src.exists():
        raise InputError(f"{src}: no such file or directory")
    model = Model.load(src)
    est = estimate(model, blocks=blocks, ratio=ratio, max_downsample=max_downsample, crossattn=crossattn, mlp=mlp)
    if as_json:
        print_json(est)
        return
    console.print(
        f"{est['blocks_merged']} of {est['blocks_found']} transformer blocks merged, "
        f"{est['tokens_removed']} tokens removed\n"
        f"GFLOPs {est['gflops_before']:.1f} -> {est['gflops_after']:.1f} "
        f"(removed {est['gflops_removed']:.1f}, merge overhead {est['merge_overhead_gflops']:.2f})\n"
        f"expected speed-up if time follows FLOPs: {est['expected_speedup']:.2f}x",
        markup=False,
    )
