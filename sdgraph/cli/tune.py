"""``sdgraph tune`` (the fastest configuration within a fidelity budget) and ``sdgraph build`` (replay a recipe)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer

from sdgraph.cli._app import command, console, err_console
from sdgraph.errors import UsageError
from sdgraph.limits import check, check_all

__all__ = ["tune_cmd", "build_cmd", "parse_duration"]

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | None) -> float | None:
    """``90``, ``90s``, ``30m``, ``2h``, ``1d`` -> seconds (bounded by ``--time``)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise UsageError(f"--time {text!r}: expected seconds or a duration like 30m, 2h")
    return check("--time", float(m.group(1)) * _UNITS[m.group(2)])


@command("tune")
def tune_cmd(
    model_dir: Path = typer.Argument(..., help="Exported model directory (the reference every trial is compared with)"),
    out: Path = typer.Option(..., "--out", "-o", help="Study folder: study.db, trials.json, front.svg, recipe.yaml"),
    targets: Optional[str] = typer.Option(None, "--targets", help="Comma-separated targets (default: the space's, usable here)"),
    min_psnr: Optional[float] = typer.Option(None, "--min-psnr", help="Budget: worst image PSNR in dB (default 30 when no budget is given)"),
    min_ssim: Optional[float] = typer.Option(None, "--min-ssim", help="Budget: worst image SSIM"),
    min_cosine: Optional[float] = typer.Option(None, "--min-cosine", help="Budget: output cosine; a UNet call under it prunes the trial"),
    min_clip: Optional[float] = typer.Option(None, "--min-clip", help="Budget: CLIP score of the trial's images (needs --clip-model)"),
    clip_model: Optional[Path] = typer.Option(None, "--clip-model", help="Local CLIP model dir for --min-clip"),
    trials: int = typer.Option(20, "--trials", help="Trials to run (more with --resume)"),
    time_limit: Optional[str] = typer.Option(None, "--time", help="Stop asking for trials after this long (90s, 30m, 2h)"),
    steps: int = typer.Option(20, "--steps", help="Denoising steps of the bench and fidelity images"),
    height: Optional[int] = typer.Option(None, "--height", help="Image height (default: the model's)"),
    width: Optional[int] = typer.Option(None, "--width", help="Image width (default: the model's)"),
    repeats: int = typer.Option(2, "--repeats", help="Timed images per trial (median)"),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps",
                                               help="Steps of each trial's two warm-up images (default: --steps)"),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", help="Prompt(s) of the fidelity images (default: one shipped prompt)"),
    seeds: str = typer.Option("0", "--seeds", help="Comma-separated seeds of the fidelity images"),
    space: Optional[Path] = typer.Option(None, "--space", help="Search space YAML (default: sdgraph/data/tune_space.yaml)"),
    storage: Optional[str] = typer.Option(None, "--storage", help="optuna storage URL (default: sqlite in the study folder)"),
    resume: bool = typer.Option(False, "--resume", help="Continue the study in the folder / storage"),
    ray: Optional[str] = typer.Option(None, "--ray", help="Run trials as Ray tasks on the cluster at HOST:PORT, or auto"),
    cpus_per_trial: Optional[int] = typer.Option(None, "--cpus-per-trial", help="CPUs each Ray trial requests (default: a node's)"),
    ship_model: bool = typer.Option(False, "--ship-model", help="Send the model dir through Ray's object store (no shared path)"),
    seed: int = typer.Option(0, "--seed", help="Sampler seed (a study is reproducible)"),
    cap: Optional[float] = typer.Option(None, "--cap", help="Stop a trial's timed image once it runs this many times "
                                        "longer than the fastest trial within budget so far (pruned: it cannot be the pick)"),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty study folder"),
    as_json: bool = typer.Option(False, "--json", help="Print the trials as JSON"),
) -> None:
    """Search passes x targets x options for the fastest configuration within a fidelity budget."""
    from sdgraph.cli._conventions import parse_seeds, print_json, print_records
    from sdgraph.pipeline.tune import Budget, load_space, tune
    from sdgraph.pipeline.tune.study import TABLE_COLUMNS, closest_line, study_rows

    check_all(min_psnr=min_psnr, min_ssim=min_ssim, min_cosine=min_cosine, min_clip=min_clip, trials=trials, steps=steps,
              height=height, width=width, repeats=repeats, warmup_steps=warmup_steps, cpus_per_trial=cpus_per_trial, seed=seed, cap=cap)
    seconds = parse_duration(time_limit)
    seed_list = parse_seeds(seeds)
    if min_clip is not None and clip_model is None:
        raise UsageError("--min-clip needs a local CLIP model: add --clip-model PATH (nothing is downloaded)")
    if trials == 0 and not resume:
        raise UsageError("--trials 0 only makes sense with --resume (rewrite the reports)")
    if cpus_per_trial is not None and not ray:
        raise UsageError("--cpus-per-trial applies to --ray")
    if ship_model and not ray:
        raise UsageError("--ship-model applies to --ray")
    budget = Budget(min_psnr=min_psnr, min_ssim=min_ssim, min_cosine=min_cosine, min_clip=min_clip)
    if all(v is None for v in (min_psnr, min_ssim, min_cosine, min_clip)):
        budget = Budget(min_psnr=30.0)
    sp = load_space(space, [t.strip() for t in targets.split(",") if t.strip()] if targets else None)

    def say(m: str) -> None:
        err_console.print(m, markup=False, style="dim")

    result = tune(model_dir, out, sp, budget=budget, trials=trials, seconds=seconds, steps=steps, height=height, width=width,
                  repeats=repeats, warmup_steps=warmup_steps, prompts=list(prompt or []), seeds=seed_list, clip_model=clip_model, storage=storage,
                  resume=resume, force=force, ray=ray, cpus_per_trial=cpus_per_trial, ship_model=ship_model, seed=seed,
                  cap=cap, progress=say)
    chosen = result.chosen["number"] if result.chosen else None
    if as_json:
        print_json({**result.summary(), "trials": result.trials})
    else:
        print_records(f"sdgraph tune: {len(result.trials)} trials, budget {budget.describe()} (* chosen)", TABLE_COLUMNS,
                      study_rows(result.trials, result.front, chosen))
        console.print(f"Pareto front (s/image vs {budget.primary}): trials {', '.join(map(str, result.front)) or 'none'}")
        for name, path in result.files.items():
            console.print(f"{name}: {path}", markup=False)
    if result.chosen is None:
        from sdgraph.errors import VerificationError

        raise VerificationError(closest_line(result))
    if as_json:
        return
    console.print(f"chosen: trial {chosen}, {result.chosen['metrics']['e2e_s']:.3f} s/image; "
                  f"build it with: sdgraph build {model_dir} --recipe {result.files['recipe.yaml']} -o ARTIFACT", markup=False)


@command("build")
def build_cmd(
    model_dir: Path = typer.Argument(..., help="Exported model directory (the one the recipe was tuned on)"),
    recipe: Path = typer.Option(..., "--recipe", help="recipe.yaml written by sdgraph tune"),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact folder to write"),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output folder"),
) -> None:
    """Replay a recipe: optimize and lower exactly as the tuned trial did; the manifest names the recipe."""
    from sdgraph.pipeline.tune import build

    res = build(model_dir, recipe, out, force=force, progress=lambda m: err_console.print(m, markup=False, style="dim"))
    console.print(f"wrote {out} ({res.target}, {res.precision}) from {recipe} in {res.seconds:.1f} s", markup=False)
