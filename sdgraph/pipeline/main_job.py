"""The README's main job: demo pipeline -> export -> optimize -> lower -> run -> bench -> verify, in one folder."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from sdgraph.errors import SdgraphError, TargetUnavailable
from sdgraph.progress import Task, task

__all__ = ["run_demo", "optimize_pipelines"]

log = logging.getLogger(__name__)


def optimize_pipelines() -> dict[str, str]:
    """The two optimize pipelines, from the passes registered now: ``fold,fa,gn`` and the same with ``tome``."""
    from sdgraph.passes.base import registry

    have = registry()
    fast = [p for p in ("fold", "fa", "gn") if p in have]
    out = {"opt": ",".join(fast)}
    if "tome" in have:
        out["tome"] = ",".join(["fold", "tome", *[p for p in fast if p != "fold"]])
    return out


def run_demo(out_dir: str | Path, *, steps: int = 10, repeats: int = 2, size: int | None = None,
             prompt: str = "a photo of an astronaut riding a horse on mars", seed: int = 0,
             openvino: bool = True, source: str | Path | None = None,
             say: Callable[[str], None] | None = None, force: bool = False) -> dict[str, Any]:
    """Run the whole chain on a random-weight tiny SD1.5 pipeline; everything lands in ``out_dir``.

    A stage whose dependency is missing is skipped with its reason in ``report["skipped"]``; a stage
    that fails with an sdgraph error is listed in ``report["failed"]``; both are said, and later stages
    run with what exists (a failed lowering of an optimized dir benches that model dir on ORT instead).
    Progress: one task ``demo``, advanced once per stage (run, skipped or failed).
    """
    with task("demo") as bar:
        return _run_demo(out_dir, steps=steps, repeats=repeats, size=size, prompt=prompt, seed=seed, openvino=openvino,
                         source=source, say=say, force=force, bar=bar)


def _run_demo(out_dir, *, steps, repeats, size, prompt, seed, openvino, source, say, force,
              bar: Task) -> dict[str, Any]:
    from sdgraph.demo import build_demo_pipeline
    from sdgraph.export import export_pipeline
    from sdgraph.passes.manager import optimize_path
    from sdgraph.pipeline.bench import bench, write_json, write_plot
    from sdgraph.pipeline.report import write_report
    from sdgraph.pipeline.runner import open_pipeline, save_images
    from sdgraph.pipeline.verify import verify_dirs
    from sdgraph.targets import lower
    from sdgraph.targets.base import targets

    say = say or (lambda m: log.info(m))
    from sdgraph.ir.outputs import guard_output

    out = Path(out_dir)
    guard_output(out, [source] if source is not None else [], force=force)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"out": str(out), "stages": {}, "skipped": [], "failed": []}
    t_all = time.perf_counter()
    ran: list[str] = []  # every stage called, run or not: the progress task's count

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        ran.append(name)
        say(f"[{name}] ...")
        bar.update(description=f"demo: {name}")
        try:
            res = fn()
        except (ImportError, TargetUnavailable) as exc:
            why = f"{name}: skipped ({exc})"
            report["skipped"].append(why)
            say(why)
            return None
        except SdgraphError as exc:  # stages after it still run where they can; the demo exits 1
            why = f"{name}: FAILED ({exc})"
            report["failed"].append(why)
            say(why)
            return None
        finally:
            bar.advance()
        report["stages"][name] = round(time.perf_counter() - t0, 2)
        say(f"[{name}] done in {report['stages'][name]:.1f} s")
        return res

    if source is not None:  # a diffusers pipeline dir given: start from it instead of building one
        src = Path(source)
    else:
        src = out / "diffusers"
        stage("demo pipeline", lambda: build_demo_pipeline(src, arch="sd15", size="tiny", seed=seed, force=True))
    model = out / "model"
    geo = {"height": size, "width": size} if size else {}
    stage("export", lambda: export_pipeline(src, model, force=True, **geo))
    pipes = optimize_pipelines()
    report["pipelines"] = pipes
    # the stages planned: pipeline, export, optimize and lower each, OpenVINO, run, bench, plot, verify each, report
    bar.update(total=(source is None) + 1 + 3 * len(pipes) + 2 * bool(openvino) + 6)
    say("optimize pipelines from the registered passes: " + "; ".join(f"{k} = {v}" for k, v in pipes.items()))
    opt_dirs: dict[str, Path] = {}
    for label, spec in pipes.items():
        d = out / f"model-{label}"
        reports = stage(f"optimize {label} ({spec})", lambda d=d, spec=spec: optimize_path(model, spec, d, force=True))
        if reports is not None:
            opt_dirs[label] = d
            report.setdefault("optimize", {})[label] = {
                sub: {"nodes_before": sum(r.ops_before.values()), "nodes_after": sum(r.ops_after.values()),
                      "stats": {rec.spec: rec.stats for rec in r.records if rec.stats}}
                for sub, r in reports.items()}
    # Lower: the reference and each optimized dir to ORT; the fast one to OpenVINO when installed.
    artifacts: dict[str, Path] = {}
    for label, d in [("fp32", model), *opt_dirs.items()]:
        a = out / f"ort-{label}"
        if stage(f"lower ort-{label}", lambda d=d, a=a: lower(d, "ort", a, force=True)) is not None:
            artifacts[f"ort-{label}"] = a
        elif label != "fp32":  # still bench and verify the optimized model dir itself, on ORT
            artifacts[f"model-{label}"] = d
    if openvino and "openvino" in targets():
        ok, why = targets()["openvino"]().available()
        if ok:
            a = out / "openvino-opt"
            src_dir = opt_dirs.get("opt", model)
            if stage("lower openvino-opt", lambda: lower(src_dir, "openvino", a, force=True)) is not None:
                artifacts["openvino-opt"] = a
        else:
            report["skipped"].append(f"lower openvino: skipped ({why})")
            say(report["skipped"][-1])
    elif openvino:
        report["skipped"].append("lower openvino: skipped (no openvino target registered)")
        say(report["skipped"][-1])
    report["artifacts"] = {k: str(v) for k, v in artifacts.items()}
    # Run one image on the fastest-looking artifact (optimized ORT when there).
    run_dir = artifacts.get("ort-opt") or artifacts.get("ort-fp32") or model

    def run_one():
        pipe = open_pipeline(run_dir)
        g = pipe.generate(prompt, steps=steps, seed=seed)
        return save_images(g.images, out / "image.png", force=True)[0]

    img = stage("run", run_one)
    report["image"] = str(img) if img else None
    bench_dirs = [model, *artifacts.values()]
    report["bench_labels"] = ["model", *artifacts]
    b = stage("bench", lambda: bench(bench_dirs, steps=steps, repeats=repeats, prompt=prompt, seed=seed, progress=say))
    if b is not None:
        report["bench"] = b
        for r in b["results"]:
            if "error" in r:
                report["failed"].append(f"bench {r['path']}: FAILED ({r['error']})")
        write_json(b, out / "bench.json", force=True)
        p = stage("plot", lambda: write_plot(b, out / "bench.png", labels=report["bench_labels"], force=True))
        report["plot"] = str(p) if p else None
    report["verify"] = {}
    for label, a in artifacts.items():
        v = stage(f"verify {label}", lambda a=a, label=label: verify_dirs(
            model, a, out / f"verify-{label}", prompts=(prompt,), seeds=(seed,), steps=steps, force=True))
        if v is not None:
            report["verify"][label] = v
    report["seconds"] = round(time.perf_counter() - t_all, 1)
    from sdgraph.ir.io import atomic_file

    def save_report() -> None:
        with atomic_file(out / "demo.json", force=True) as tmp:
            tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")

    save_report()
    # The HTML report reads demo.json and the verify folders: written last, then recorded in demo.json.
    page = stage("report", lambda: write_report([out], out / "report.html", title="sdgraph demo", force=True)[0])
    report["report"] = str(page) if page else None
    save_report()
    bar.update(total=len(ran))  # stages not called (no OpenVINO here, no bench to plot) leave the plan
    return report
