"""Commands that use built models: ``sdgraph run``, ``bench``, ``verify`` and the main job ``demo``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.table import Table

from sdgraph.cli._app import command, console, err_console
from sdgraph.cli._conventions import print_json
from sdgraph.errors import InputError, PassError, UsageError
from sdgraph.limits import check_all

__all__ = ["run_cmd", "bench_cmd", "verify_cmd", "demo_cmd", "bench_table", "verify_table"]


_SPACING_HELP = "leading | trailing | linspace (default: the scheduler config's; trailing starts 1 step at t=999)"

_CONTROL_HELP = "Conditioning image of the model's ControlNet (resized to the output size, with a note)"
_SCALE_HELP = "ControlNet conditioning scale (its residuals are multiplied by it)"

# The image options run, bench and verify share, declared once (each command gives its own default).
Steps = Annotated[int, typer.Option("--steps", help="Denoising steps (1 for Turbo)")]
Height = Annotated[Optional[int], typer.Option("--height", help="Pixels, a multiple of the VAE factor (default: the model's size)")]
Width = Annotated[Optional[int], typer.Option("--width", help="Pixels, a multiple of the VAE factor (default: the model's size)")]
Scheduler = Annotated[Optional[str], typer.Option("--scheduler", help="ddim | euler | euler-a | dpm++ | lcm (default: the model dir's)")]
Guidance = Annotated[float, typer.Option("--guidance", help="Classifier-free guidance scale (0 or 1: no guidance, one UNet batch: Turbo)")]
Spacing = Annotated[Optional[str], typer.Option("--timestep-spacing", help=_SPACING_HELP)]
Image = Annotated[Optional[Path], typer.Option("--image", help="Init image: img2img, or the edited image of an InstructPix2Pix model")]
Strength = Annotated[float, typer.Option("--strength", help="img2img strength (steps x strength must be >= 1)")]
ImageGuidance = Annotated[float, typer.Option("--image-guidance", help="InstructPix2Pix image guidance scale")]
Devices = Annotated[int, typer.Option("--devices", help="Split the guidance batch over this many UNet instances, run concurrently")]
ControlImage = Annotated[Optional[Path], typer.Option("--control-image", help="ControlNet models: " + _CONTROL_HELP)]
ControlScale = Annotated[float, typer.Option("--control-scale", help=_SCALE_HELP)]
AsJson = Annotated[bool, typer.Option("--json", help="Print the command's data as JSON on stdout instead of the tables")]


def _init_image(image: Optional[Path]) -> Optional[Path]:
    """``--image`` checked to exist (one line and exit 2 otherwise)."""
    if image is not None and not image.is_file():
        raise InputError(f"{image}: no such image file")
    return image


def _control_image(controlnet: bool, control_image: Optional[Path]) -> Optional[Path]:
    """``--controlnet`` with ``--control-image``: both or neither; the image must exist."""
    if controlnet and control_image is None:
        raise UsageError("--controlnet needs --control-image IMG (the conditioning image)")
    if control_image is not None and not controlnet:
        raise UsageError("--control-image goes with --controlnet")
    if control_image is not None and not control_image.is_file():
        raise InputError(f"{control_image}: no such image file")
    return control_image




@command("run")
def run_cmd(
    model_dir: Path = typer.Argument(..., help="Lowered artifact dir, or an exported model dir (runs on ONNX Runtime)"),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Text prompt"),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="One prompt per line"),
    negative_prompt: str = typer.Option("", "--negative-prompt", help="Negative prompt"),
    steps: Steps = 20,
    guidance: Guidance = 7.5,
    seed: int = typer.Option(0, "--seed", help="Seed; image i of a prompt uses seed + i"),
    height: Height = None,
    width: Width = None,
    scheduler: Scheduler = None,
    eta: float = typer.Option(0.0, "--eta", help="DDIM eta"),
    num_images: int = typer.Option(1, "--num-images", "-n", help="Images per prompt"),
    grid: bool = typer.Option(False, "--grid", help="Also write a grid of all images"),
    image: Image = None,
    strength: Strength = 0.8,
    image_guidance: ImageGuidance = 1.5,
    devices: Devices = 1,
    out: Path = typer.Option(..., "--out", "-o", help="Output .png (one image) or folder"),
    force: bool = typer.Option(False, "--force", help="Replace an existing image or non-empty output folder"),
    timestep_spacing: Spacing = None,
    controlnet: bool = typer.Option(False, "--controlnet", help="Condition with the model's ControlNet on --control-image"),
    control_image: Optional[Path] = typer.Option(None, "--control-image", help=_CONTROL_HELP),
    control_scale: ControlScale = 1.0,
    as_json: AsJson = False,
) -> None:
    """Generate images: txt2img, img2img, InstructPix2Pix, SDXL/Turbo, ControlNet, on any target's artifacts."""
    from sdgraph.ir.outputs import guard_output, model_inputs
    from sdgraph.pipeline.runner import check_text, load_image, open_pipeline, read_prompts, save_images

    check_all(steps=steps, seed=seed, height=height, width=width, guidance=guidance, image_guidance=image_guidance,
              strength=strength, eta=eta, devices=devices, num_images=num_images, control_scale=control_scale)
    _control_image(controlnet, control_image)
    guard_output(out, model_inputs(model_dir) + [p for p in (image, prompt_file, control_image) if p is not None],
                 force=force)
    prompts = read_prompts(prompt, prompt_file)
    check_text(negative_prompt, "--negative-prompt")
    _init_image(image)
    pipe = open_pipeline(model_dir, devices=devices)
    h, w = height or pipe.default_size()[0], width or pipe.default_size()[1]
    pipe.check_size(h, w)
    init = None
    if image is not None:
        notes: list[str] = []
        init = load_image(image, w, h, notes)
        for n in notes:
            err_console.print(f"note: {n}", markup=False)
    control = None
    if control_image is not None:
        if pipe.controlnet is None:
            raise InputError(f"{model_dir}: no controlnet submodel (export a ControlNet pipeline, or with "
                             "sdgraph export --controlnet DIR)")
        notes = []
        control = load_image(control_image, w, h, notes)
        for n in notes:
            err_console.print(f"note: control {n}", markup=False)
    images, total, first_t, all_notes = [], 0.0, None, []
    for p in prompts:
        for i in range(num_images):
            g = pipe.generate(p, negative_prompt=negative_prompt, steps=steps, guidance=guidance, seed=seed + i,
                              height=h, width=w, scheduler=scheduler, eta=eta, image=init, strength=strength,
                              image_guidance=image_guidance, timestep_spacing=timestep_spacing,
                              control_image=control, control_scale=control_scale)
            images += g.images
            total += g.seconds
            first_t = g.timesteps[0] if g.timesteps else None
            all_notes += [n for n in g.notes if n not in all_notes]
            for n in g.notes:
                err_console.print(f"note: {n}", markup=False)
    written = save_images(images, out, grid=grid, force=force)
    if as_json:
        print_json({"images": [str(p) for p in written], "count": len(images), "prompts": prompts,
                    "width": w, "height": h, "target": pipe.target, "steps": steps, "seed": seed,
                    "seconds": total, "seconds_per_image": total / len(images), "first_timestep": first_t,
                    "notes": all_notes})
        return
    console.print(f"{len(images)} image(s) {w}x{h} on {pipe.target} in {total:.2f} s "
                  f"({total / len(images):.2f} s/image, first timestep {first_t:g}) -> "
                  f"{', '.join(map(str, written[:4]))}"
                  + (" ..." if len(written) > 4 else ""))


def bench_table(report: dict, labels: list[str] | None = None) -> list[Table]:
    """Two tables: the headline numbers with ratios vs the first dir, and per-submodel latency."""
    from sdgraph.ir.modeldir import SUBMODELS
    from sdgraph.pipeline.bench import split_results

    ran, failed = split_results(report, labels)
    names, res = [n for n, _ in ran], [r for _, r in ran]
    t = Table(title=f"bench: {report['steps']} steps, {res[0]['height']}x{res[0]['width']}, median of {report['repeats']}")
    for col in ("dir", "s/image", "speedup", "UNet it/s", "UNet MB", "warm-up compile s", "warm-up cache s",
                "peak RSS MB"):
        t.add_column(col, justify="left" if col == "dir" else "right")
    for n, r in zip(names, res):
        unet_mb = r.get("submodel_mb", {}).get("unet")
        t.add_row(n, f"{r['e2e_s']:.3f}", f"{r['ratios']['e2e_speedup']:.2f}x", f"{r['unet_its']:.2f}",
                  "-" if unet_mb is None else f"{unet_mb:.2f}",
                  f"{r['warmup_compile_s']:.2f}", f"{r['warmup_cache_s']:.2f}", f"{r['peak_rss_delta_mb']:.0f}")
    variants = sorted({k for r in res for k in r["submodel_ms"] if k.startswith("unet_")})  # deepcache's unet_shallow
    subs = [s for s in (x for role in SUBMODELS for x in ((role, *variants) if role == "unet" else (role,)))
            if any(s in r["submodel_ms"] for r in res)]
    t2 = Table(title="latency per call (ms)")
    t2.add_column("dir")
    t2.add_column("target")
    t2.add_column("load s", justify="right")
    for s in subs:
        t2.add_column(s, justify="right")
    for n, r in zip(names, res):
        t2.add_row(n, r["target"], f"{r['load_s']:.2f}",
                   *[f"{r['submodel_ms'][s]:.1f}" if s in r["submodel_ms"] else "-" for s in subs])
    for n, r in failed:
        t.add_row(n, "failed", "-", "-", "-", "-", "-", "-")
        t2.add_row(n, "-", "-", *[r["error"][:60] if i == 0 else "-" for i in range(len(subs))])
    return [t, t2]


@command("bench")
def bench_cmd(
    dirs: List[Path] = typer.Argument(..., help="Model or artifact dirs; ratios are against the first"),
    steps: Steps = 20,
    height: Height = None,
    width: Width = None,
    repeats: int = typer.Option(3, "--repeats", help="Timed images per dir (median)"),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps",
                                               help="Steps of the two warm-up images (default: --steps)"),
    devices: Devices = 1,
    scheduler: Scheduler = None,
    as_json: AsJson = False,
    json_out: Optional[Path] = typer.Option(None, "--json-out", help="Write the numbers as JSON to this file (bench.json)"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG bar chart"),
    images_out: Optional[Path] = typer.Option(None, "--images-out",
                                              help="Folder for each dir's last timed image (image_000.png, ...)"),
    force: bool = typer.Option(False, "--force", help="Replace existing --json-out / --plot / --images-out"),
    guidance: Guidance = 7.5,
    timestep_spacing: Spacing = None,
    image: Image = None,
    strength: Strength = 0.8,
    image_guidance: ImageGuidance = 1.5,
    control_image: ControlImage = None,
    control_scale: ControlScale = 1.0,
) -> None:
    """Latency per submodel, UNet it/s, s/image, peak RSS and warm-up, for each dir in one process run."""
    from sdgraph.ir.outputs import guard_output
    from sdgraph.pipeline.bench import bench, split_results, write_json, write_plot

    check_all(steps=steps, height=height, width=width, repeats=repeats, devices=devices, guidance=guidance,
              strength=strength, image_guidance=image_guidance, control_scale=control_scale,
              warmup_steps=warmup_steps)
    _control_image(control_image is not None, control_image)
    for d in dirs:
        if as_json and d.suffix == ".json" and not d.is_dir():  # the old `--json FILE`
            raise UsageError(f"--json {d}: --json prints the JSON on stdout now; write a file with --json-out {d}")
        if not d.is_dir():
            raise InputError(f"{d}: not a directory")
    for o, what in ((json_out, "--json-out file"), (plot, "--plot file"), (images_out, "--images-out folder")):
        if o is not None:
            guard_output(o, list(dirs), force=force, what=what)
    _init_image(image)
    report = bench(dirs, steps=steps, height=height, width=width, repeats=repeats, devices=devices,
                   scheduler=scheduler, guidance=guidance, timestep_spacing=timestep_spacing, image=image,
                   strength=strength, image_guidance=image_guidance, control_image=control_image,
                   control_scale=control_scale, warmup_steps=warmup_steps, images_out=images_out, force=force,
                   progress=lambda m: err_console.print(m, markup=False))
    say = err_console if as_json else console  # with --json, stdout holds the JSON only
    if as_json:
        print_json(report)
    else:
        for t in bench_table(report):
            console.print(t)
    if json_out:
        say.print(f"json: {write_json(report, json_out, force=force)}", markup=False)
    if plot:
        say.print(f"plot: {write_plot(report, plot, force=force)}", markup=False)
    _, failed = split_results(report)
    if failed:
        first = failed[0][1]
        raise PassError(f"{len(failed)} of {len(report['results'])} dir(s) failed; first: {first['path']}: {first['error']}")


def _fmt(x: float) -> str:
    return "inf" if isinstance(x, float) and math.isinf(x) else f"{x:.4g}"


def verify_table(report: dict, title: str = "verify") -> Table:
    t = Table(title=title)
    for col in ("what", "max abs", "max rel", "cosine", "PSNR dB", "SSIM", "max pixel diff"):
        t.add_column(col, justify="left" if col == "what" else "right")
    for name, s in report.get("submodels", {}).items():
        w = s["worst"]
        t.add_row(name, _fmt(w["max_abs"]), _fmt(w["max_rel"]), f"{w['cosine']:.6f}", "", "", "")
    for m in report.get("images", []):
        t.add_row(f"image, seed {m['seed']}", "", "", "", _fmt(m["psnr"]), f"{m['ssim']:.4f}",
                  str(m["max_pixel_diff"]))
    return t


@command("verify")
def verify_cmd(
    ref: Path = typer.Argument(..., help="Reference: model dir, artifact dir, or a .onnx file"),
    cand: Path = typer.Argument(..., help="Candidate of the same kind"),
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", help="Fixed prompt(s) for end-to-end images"),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file"),
    seeds: str = typer.Option("0", "--seeds", help="Comma-separated seeds"),
    steps: Steps = 10,
    height: Height = None,
    width: Width = None,
    scheduler: Scheduler = None,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the side-by-side sheet, images and verify.json"),
    clip_model: Optional[Path] = typer.Option(None, "--clip-model", help="Local CLIP model dir for CLIP score"),
    fid_model: Optional[Path] = typer.Option(None, "--fid-model", help="Local TorchScript Inception file for FID. "
                                             "Loading TorchScript runs code from the file: use trusted files only"),
    min_psnr: Optional[float] = typer.Option(None, "--min-psnr", help="Fail below this PSNR (dB)"),
    min_ssim: Optional[float] = typer.Option(None, "--min-ssim", help="Fail below this SSIM"),
    max_pixel_diff: Optional[int] = typer.Option(None, "--max-pixel-diff", help="Fail above this max pixel difference"),
    min_cosine: Optional[float] = typer.Option(None, "--min-cosine", help="Fail below this output cosine"),
    max_abs: Optional[float] = typer.Option(None, "--max-abs", help="Fail above this max abs output difference"),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out folder"),
    guidance: Guidance = 7.5,
    timestep_spacing: Spacing = None,
    image: Image = None,
    strength: Strength = 0.8,
    image_guidance: ImageGuidance = 1.5,
    control_image: ControlImage = None,
    control_scale: ControlScale = 1.0,
    as_json: AsJson = False,
    ray: Optional[str] = typer.Option(None, "--ray", help="Make the images as Ray tasks on the cluster at HOST:PORT (or auto)"),
) -> None:
    """Fidelity of CAND against REF: numbers per submodel/output, PSNR/SSIM of images, an image sheet."""
    from sdgraph.pipeline.runner import check_text, read_prompts
    from sdgraph.ir.outputs import guard_output, model_inputs
    from sdgraph.pipeline.verify import (DEFAULT_PROMPTS, check_thresholds, compare_onnx_files, raise_on, verify_dirs,
                                         write_verify_dir)

    check_all(steps=steps, height=height, width=width, min_psnr=min_psnr, min_ssim=min_ssim,
              max_pixel_diff=max_pixel_diff, min_cosine=min_cosine, max_abs=max_abs, guidance=guidance,
              strength=strength, image_guidance=image_guidance, control_scale=control_scale)
    _control_image(control_image is not None, control_image)
    for p in (ref, cand):
        if not p.exists():
            raise InputError(f"{p}: no such file or directory")
    if out is not None:
        guard_output(out, model_inputs(ref) + model_inputs(cand) + [p for p in (prompt_file, clip_model, fid_model) if p],
                     force=force)
    _init_image(image)
    from sdgraph.cli._conventions import parse_seeds

    seed_list = parse_seeds(seeds)
    for text in prompt or []:
        check_text(text, "--prompt")
    if ref.is_file() != cand.is_file():
        raise UsageError("compare two .onnx files or two directories, not one of each")
    if ray and ref.is_file():
        raise UsageError("--ray spreads image generation: it applies to two directories, not .onnx files")
    if ray:
        from sdgraph.pipeline.ray_pool import check_address

        check_address(ray)
    if ref.is_file():
        from sdgraph.ir.runtime import worst

        per = compare_onnx_files(ref, cand)
        report = {"reference": str(ref), "candidate": str(cand), "submodels": {ref.name: {"outputs": per, "worst": worst(per)}}}
        t = Table(title=f"verify {ref.name} vs {cand.name}")
        for col in ("output", "max abs", "max rel", "cosine"):
            t.add_column(col, justify="left" if col == "output" else "right")
        for name, m in per.items():
            t.add_row(name, _fmt(m["max_abs"]), _fmt(m["max_rel"]), f"{m['cosine']:.6f}")
        if not as_json:
            console.print(t)
        report["summary"] = {"cosine_min": worst(per)["cosine"], "max_abs": worst(per)["max_abs"]}
    else:
        prompts = list(prompt) if prompt else (read_prompts(None, prompt_file) if prompt_file else list(DEFAULT_PROMPTS))
        report = verify_dirs(ref, cand, out, prompts=prompts, seeds=seed_list, steps=steps, height=height,
                             width=width, scheduler=scheduler, clip_model=clip_model, fid_model=fid_model, force=force,
                             guidance=guidance, timestep_spacing=timestep_spacing, image=image, strength=strength,
                             image_guidance=image_guidance, control_image=control_image, control_scale=control_scale,
                             ray=ray)
    if as_json:
        print_json(report)
    elif not ref.is_file():
        console.print(verify_table(report, f"verify {cand} against {ref}"))
        for n in report["notes"]:
            console.print(f"note: {n}", markup=False)
        if "clip_score" in report:
            console.print(f"CLIP score: reference {report['clip_score']['reference']:.3f}, "
                          f"candidate {report['clip_score']['candidate']:.3f}")
        if "fid" in report:
            console.print(f"FID (candidate vs reference images): {report['fid']:.3f}")
        if report.get("sheet"):
            console.print(f"sheet: {report['sheet']}")
    if out is not None and ref.is_file():
        write_verify_dir(out, report, force=force)
    raise_on(check_thresholds(report, min_psnr=min_psnr, min_ssim=min_ssim, max_pixel=max_pixel_diff,
                              min_cosine=min_cosine, max_abs=max_abs))


@command("demo")
def demo_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for everything: models, artifacts, images, plot, JSON"),
    steps: Steps = 10,
    repeats: int = typer.Option(2, "--repeats", help="Timed images per dir in the bench"),
    size: Optional[int] = typer.Option(None, "--size", help="Image size in pixels (default: the demo model's, 128)"),
    no_openvino: bool = typer.Option(False, "--no-openvino", help="Do not lower to OpenVINO even when installed"),
    source: Optional[Path] = typer.Option(None, "--from", help="Start from this diffusers pipeline dir instead of building the tiny demo one"),
    force: bool = typer.Option(False, "--force", help="Write into a non-empty --out folder, replacing what the demo writes"),
    as_json: AsJson = False,
) -> None:
    """The main job: random-weight demo pipeline -> export -> optimize -> lower -> run -> bench -> verify."""
    from sdgraph.pipeline.main_job import run_demo

    check_all(steps=steps, repeats=repeats, size=size)
    if source is not None and not source.is_dir():
        raise InputError(f"{source}: not a diffusers pipeline directory")
    rep = run_demo(out, steps=steps, repeats=repeats, size=size, openvino=not no_openvino, source=source,
                   say=lambda m: err_console.print(m, markup=False), force=force)
    if as_json:
        print_json(rep)
        for f in rep["failed"]:
            err_console.print(f"failed: {f}", markup=False)
        if rep["failed"]:
            raise typer.Exit(1)
        return
    t = Table(title="stages")
    t.add_column("stage")
    t.add_column("seconds", justify="right")
    for k, v in rep["stages"].items():
        t.add_row(k, f"{v:.1f}")
    console.print(t)
    for s in rep["skipped"]:
        console.print(f"skipped: {s}", markup=False)
    for label, o in rep.get("optimize", {}).items():
        ot = Table(title=f"optimize {label}: {rep['pipelines'][label]}")
        for col in ("submodel", "nodes before", "nodes after", "pass stats"):
            ot.add_column(col)
        for sub, d in o.items():
            ot.add_row(sub, str(d["nodes_before"]), str(d["nodes_after"]),
                       "; ".join(f"{p} " + ", ".join(f"{k}={v}" for k, v in [(k, v) for k, v in s.items()
                                                                          if isinstance(v, (int, float)) and v][:2])
                                 for p, s in d["stats"].items()))
        console.print(ot)
    if rep.get("bench"):
        for t in bench_table(rep["bench"], rep["bench_labels"]):
            console.print(t)
    for label, v in rep.get("verify", {}).items():
        console.print(verify_table(v, f"verify {label} against model (exported, ORT, no passes)"))
    console.print(f"image: {rep.get('image')}  plot: {rep.get('plot')}  all in {out} ({rep['seconds']:.0f} s)")
    if rep.get("report"):
        console.print(f"report: {rep['report']} (open it in a browser)", markup=False)
    for f in rep["failed"]:
        err_console.print(f"failed: {f}", markup=False)
    if rep["failed"]:
        raise typer.Exit(1)
