"""``sdgraph tune``: an optuna study over the space, trials run here one at a time or as Ray tasks.

Two objectives: seconds per image (bench's median, minimized) and the budget's primary fidelity
(PSNR by default, maximized). The driver asks optuna for each trial's configuration (sampled in a
fixed order with a seeded sampler, so a study is reproducible), runs it (``objective.run_trial``, here
or on a Ray worker) and tells the result; every result is stored in the trial's user attributes, so
the storage alone is the study. A configuration already measured in the study is not run again: its
trial reuses the earlier numbers (``duplicate_of``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from sdgraph.errors import InputError, TargetUnavailable, UsageError
from sdgraph.pipeline.tune.objective import PSNR_CAP, Budget, run_trial
from sdgraph.pipeline.tune.recipe import recipe_text
from sdgraph.pipeline.tune.space import Space, config_key

__all__ = ["TuneResult", "tune", "study_rows", "closest_line", "STUDY_NAME", "TABLE_COLUMNS"]

STUDY_NAME = "sdgraph-tune"
_SETTINGS_KEPT = ("model_dir", "steps", "height", "width", "guidance", "prompts", "seeds")


@dataclasses.dataclass
class TuneResult:
    study_dir: Path
    storage: str
    trials: list[dict[str, Any]]
    front: list[int]
    chosen: dict[str, Any] | None
    budget: Budget
    files: dict[str, str]
    notes: list[str]

    def summary(self) -> dict[str, Any]:
        return {"study_dir": str(self.study_dir), "storage": self.storage, "budget": dataclasses.asdict(self.budget),
                "objectives": ["e2e_s (minimize)", f"{self.budget.primary} (maximize)"],
                "trials": len(self.trials), "front": self.front,
                "chosen": self.chosen["number"] if self.chosen else None, "files": self.files, "notes": self.notes}


def _optuna():
    try:
        import optuna
    except ImportError:
        raise TargetUnavailable("sdgraph tune needs optuna: pip install 'sdgraph[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna


def _fidelity(metrics: Mapping[str, Any], key: str) -> float:
    x = metrics.get(key)
    if not isinstance(x, (int, float)) or x != x:
        return -math.inf
    return min(float(x), PSNR_CAP) if key == "psnr_min" else float(x)


def _close_interrupted(study, optuna, say) -> None:
    """Trials left RUNNING by a driver that was stopped (Ctrl-C, a killed process) fail as interrupted; their
    configurations are asked again like any other (they hold no result, so they are not reused)."""
    stale = [t.number for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    for number in stale:
        study.tell(number, state=optuna.trial.TrialState.FAIL)
        say(f"trial {number}: interrupted by the stopped run; recorded as failed")
    if stale:
        study.set_user_attr("interrupted", sorted(set(study.user_attrs.get("interrupted", [])) | set(stale)))


def _record(trial, optuna, interrupted: Sequence[int] = ()) -> dict[str, Any]:
    r = dict(trial.user_attrs.get("result") or {})
    if trial.number in interrupted and not r:
        r.update(status="failed", error="interrupted: the study was stopped during this trial")
    r.update(number=trial.number, state=trial.state.name.lower(), params=dict(trial.params))
    if trial.user_attrs.get("duplicate_of") is not None:
        r["duplicate_of"] = trial.user_attrs["duplicate_of"]
    return r


def _pareto(records: list[dict[str, Any]], key: str) -> list[int]:
    """Trials no other trial beats on both s/image (lower) and fidelity (higher); duplicates of a front trial stay out."""
    pts = [(r["number"], r["metrics"]["e2e_s"], _fidelity(r["metrics"], key)) for r in records
           if r["state"] == "complete" and "e2e_s" in r.get("metrics", {}) and r.get("duplicate_of") is None]
    return sorted(n for n, s, f in pts if not any((s2 <= s and f2 >= f) and (s2 < s or f2 > f) for _, s2, f2 in pts))


def _label(config: Mapping[str, Any]) -> str:
    opts = " ".join(f"{k}={v}" for k, v in sorted((config.get("options") or {}).items()))
    return f"{config['target']} {config.get('precision') or ''} {opts} | {config['pipeline']}".replace("  ", " ")


def study_rows(trials: Sequence[Mapping[str, Any]], front: Sequence[int], chosen: int | None) -> list[tuple]:
    def num(x, fmt):
        return format(x, fmt) if isinstance(x, (int, float)) and x == x else ""

    rows = []
    for r in trials:
        m, c = r.get("metrics", {}), r.get("config", {})
        within = "" if r["state"] != "complete" else ("yes" if not r.get("fails") else "no")
        note = r.get("error") or ("; ".join(r.get("fails") or []))
        if r.get("duplicate_of") is not None:
            note = f"same as trial {r['duplicate_of']}" + (f"; {note}" if note else "")
        rows.append((r["number"] if r["number"] != chosen else f"{r['number']} *", r["state"], c.get("target", ""),
                     c.get("precision") or "", " ".join(f"{k}={v}" for k, v in sorted((c.get("options") or {}).items())),
                     c.get("pipeline", ""), num(m.get("e2e_s"), ".3f") or (f"> {num(m.get('e2e_s_at_least'), '.3f')}"
                                                                           if "e2e_s_at_least" in m else ""), num(m.get("psnr_min"), ".2f"),
                     num(m.get("ssim_min"), ".4f"), num(m.get("unet_cosine"), ".6f"), within,
                     "yes" if r["number"] in front else "", note))
    return rows


TABLE_COLUMNS = ("trial", "state", "target", "precision", "options", "pipeline", "s/image", "PSNR", "SSIM",
                 "UNet cosine", "within budget", "front", "note")


_SVG_STYLE = ("<style>text{font:11px sans-serif}.chart-title{font-weight:bold}.chart-frame{fill:none;stroke:#bbb}"
              ".chart-front{fill:none;stroke:#e45756;stroke-width:2}.pt{fill:#4c78a8;opacity:.8}.pt.front{fill:#e45756}</style>")


def _check_resume(study, settings: Mapping[str, Any]) -> None:
    old = study.user_attrs.get("settings")
    if not old:
        return
    for k in _SETTINGS_KEPT:
        if old.get(k) != settings.get(k):
            raise UsageError(f"--resume: the study was run with {k} = {old.get(k)!r}, not {settings.get(k)!r}; "
                             "resume with the same settings")


def tune(model_dir: str | os.PathLike, study_dir: str | os.PathLike, space: Space, *, budget: Budget,
         trials: int = 20, seconds: float | None = None, steps: int = 20, height: int | None = None,
         width: int | None = None, guidance: float = 7.5, repeats: int = 2, warmup_steps: int | None = None, prompts: Sequence[str] = (),
         seeds: Sequence[int] = (0,), clip_model: str | os.PathLike | None = None, storage: str | None = None,
         resume: bool = False, force: bool = False, ray: str | None = None, cpus_per_trial: int | None = None,
         ship_model: bool = False, seed: int = 0, cap: float | None = None,
         progress: Callable[[str], None] | None = None) -> TuneResult:
    """Run (or with ``resume`` continue) a study; write the reports; return the trials, the front and the pick.

    ``cap`` (adaptive capping): a trial's timed image is stopped once it runs ``cap`` x longer than the fastest
    trial within budget so far, and the trial is pruned: it cannot be the pick. None: every image runs to the end.

    Raises VerificationError (exit 1) after writing the reports when no trial meets the budget.
    """
    from sdgraph.ir import outputs
    from sdgraph.manifest import read_manifest
    from sdgraph.pipeline.verify import DEFAULT_PROMPTS

    optuna = _optuna()
    say = progress or (lambda m: logging.getLogger("sdgraph").info(m))
    model_dir, study_dir = Path(model_dir), Path(study_dir)
    if not model_dir.is_dir() or not read_manifest(model_dir):
        raise InputError(f"{model_dir}: not a model directory (export one with `sdgraph export`)")
    if budget.min_clip is not None and clip_model is None:
        raise UsageError("--min-clip needs a local CLIP model: add --clip-model PATH (nothing is downloaded)")
    if clip_model is not None and not Path(clip_model).is_dir():
        raise InputError(f"{clip_model}: CLIP model folder not found")
    if ray:  # an unreachable cluster is refused before the study folder is touched
        from sdgraph.pipeline.ray_pool import check_address

        check_address(ray)
    final = outputs.real_output(study_dir)
    outputs.guard_output(study_dir, outputs.model_inputs(model_dir), force=force or resume)
    if not resume:
        if force and final.is_dir():
            for name in ("study.db", "trials.json", "front.svg", "recipe.yaml", "summary.json"):
                (final / name).unlink(missing_ok=True)
    elif storage is None and not (final / "study.db").is_file():
        raise InputError(f"{study_dir}: no study to resume (study.db missing)")
    final.mkdir(parents=True, exist_ok=True)
    storage_url = storage or f"sqlite:///{final / 'study.db'}"
    settings = {"model_dir": str(model_dir.resolve()), "steps": steps, "height": height, "width": width,
                "guidance": guidance, "repeats": repeats, "warmup_steps": warmup_steps, "prompts": list(prompts or DEFAULT_PROMPTS[:1]),
                "seeds": list(seeds), "budget": dataclasses.asdict(budget),
                "clip_model": str(clip_model) if clip_model else None, "work_dir": str(final / ".work")}
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=10, constant_liar=True)
    try:
        if resume:
            study = optuna.load_study(study_name=STUDY_NAME, storage=storage_url, sampler=sampler)
        else:
            study = optuna.create_study(study_name=STUDY_NAME, storage=storage_url, sampler=sampler,
                                        directions=["minimize", "maximize"])
    except KeyError:
        raise InputError(f"{storage_url}: no study named {STUDY_NAME!r} to resume") from None
    except optuna.exceptions.DuplicatedStudyError:
        raise InputError(f"{storage_url}: already holds a study; continue it with --resume") from None
    except Exception as exc:  # noqa: BLE001 - a storage URL optuna cannot open is bad input
        if isinstance(exc, (InputError, UsageError)):
            raise
        raise InputError(f"--storage {storage_url}: cannot open ({str(exc).splitlines()[0][:200]})") from None
    if resume:
        _check_resume(study, settings)
        _close_interrupted(study, optuna, say)
        for left in (final / ".work").glob("trial-*"):  # a stopped run's trial folders (GBs each on a full model)
            shutil.rmtree(left, ignore_errors=True)
        # the sampler's random state is not stored: seeded as at the start, it would ask the same configurations
        # again; seeded with the trial count it goes on, and a resumed study is still reproducible
        study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials), n_startup_trials=10, constant_liar=True)
    else:
        study.set_user_attr("settings", {k: settings[k] for k in _SETTINGS_KEPT})
        study.set_user_attr("space", space.describe())
    for n in space.notes:
        say(f"note: {n}")

    executor = None
    if ray:
        from sdgraph.pipeline.tune.ray_exec import RayExecutor

        executor = RayExecutor(ray, str(model_dir.resolve()), settings, cpus_per_trial, ship=ship_model)
        say(f"ray {ray}: {executor.slots} trial(s) at a time, {executor.cpus} CPU(s) each")
    done_keys = {config_key(t.user_attrs["result"]["config"]): t.number for t in study.trials
                 if t.state.name in ("COMPLETE", "PRUNED", "FAIL") and t.user_attrs.get("result")}
    t_end = time.monotonic() + seconds if seconds else math.inf
    running: dict[int, Any] = {}  # trial number -> optuna trial (Ray mode)
    asked = 0
    try:
        while True:
            slots = executor.slots if executor else 1
            while asked < trials and time.monotonic() < t_end and len(running) < slots:
                trial = study.ask()
                config = space.sample(trial)
                asked += 1
                key = config_key(config)
                if key in done_keys:  # measured already: reuse, do not rebuild
                    first = study.trials[done_keys[key]]
                    trial.set_user_attr("result", first.user_attrs["result"])
                    trial.set_user_attr("duplicate_of", first.number)
                    if first.state.name == "COMPLETE":
                        study.tell(trial, first.values)
                    else:
                        study.tell(trial, state=first.state)
                    say(f"trial {trial.number}: same configuration as trial {first.number}")
                    continue
                trial_settings = _capped(settings, study, budget, cap)
                say(f"trial {trial.number}: {_label(config)}" + (f" (cap {trial_settings['time_limit_s']:.1f} s)"
                                                                 if trial_settings.get("time_limit_s") else ""))
                if executor:
                    executor.submit(trial.number, config, trial_settings)
                    running[trial.number] = (trial, config, trial_settings)
                else:
                    running[trial.number] = (trial, config, trial_settings)
                    break
            if not running:
                break
            if executor:
                number, res = executor.next_result()
            else:
                number = next(iter(running))
                res = run_trial(settings["model_dir"], running[number][1], running[number][2])
            trial, config, _ = running.pop(number)
            res["config"] = dict(config)
            _tell(study, trial, res, budget, optuna)
            done_keys.setdefault(config_key(config), number)
            say(f"trial {number}: {res['status']}" + (f" ({res['error']})" if res.get("error") else
                                                       f" {res['metrics'].get('e2e_s', 0):.3f} s/image, "
                                                       f"{budget.primary} {res['metrics'].get(budget.primary)}"))
    finally:
        if executor:
            executor.close()
    return _report(study, final, study_dir, storage_url, settings, budget, space, force or resume, optuna)


def _capped(settings: Mapping[str, Any], study, budget: Budget, cap: float | None) -> Mapping[str, Any]:
    """The settings of the next trial: with ``cap``, a time limit of cap x the fastest trial within budget so far."""
    if not cap:
        return settings
    best = [t.user_attrs["result"]["metrics"]["e2e_s"] for t in study.trials
            if t.state.name == "COMPLETE" and (t.user_attrs.get("result") or {}).get("metrics", {}).get("e2e_s")
            and not budget.fails(t.user_attrs["result"]["metrics"])]
    return {**settings, "time_limit_s": cap * min(best)} if best else settings


def _tell(study, trial, res: dict[str, Any], budget: Budget, optuna) -> None:
    trial.set_user_attr("result", json.loads(json.dumps(res, default=str)))
    if res["status"] == "ok":
        study.tell(trial, [res["metrics"]["e2e_s"], _fidelity(res["metrics"], budget.primary)])
    else:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED if res["status"] == "pruned" else optuna.trial.TrialState.FAIL)


def _report(study, final: Path, shown: Path, storage_url: str, settings: Mapping[str, Any], budget: Budget,
            space: Space, force: bool, optuna) -> TuneResult:
    from sdgraph.ir.io import atomic_file
    from sdgraph.pipeline.svg import scatter_chart

    interrupted = study.user_attrs.get("interrupted", [])
    records = [_record(t, optuna, interrupted) for t in study.trials if t.state.name in ("COMPLETE", "PRUNED", "FAIL")]
    for r in records:  # the budget of this run decides (a resumed study may tighten or loosen it)
        if r["state"] == "complete":
            r["fails"] = budget.fails(r.get("metrics", {}))
    front = _pareto(records, budget.primary)
    ok = [r for r in records if r["state"] == "complete" and not r["fails"]]
    chosen = min(ok, key=lambda r: (r["metrics"]["e2e_s"], r["number"])) if ok else None
    files: dict[str, str] = {}

    def write(name: str, text: str) -> None:
        with atomic_file(final / name, force=True) as tmp:
            tmp.write_text(text)
        files[name] = str(shown / name)

    key = budget.primary
    points = [{"e2e_s": r["metrics"]["e2e_s"], key: _fidelity(r["metrics"], key), "front": r["number"] in front,
               "label": f"trial {r['number']}: {_label(r['config'])}"}
              for r in records if r["state"] == "complete" and r.get("duplicate_of") is None]
    svg = scatter_chart(points, x="e2e_s", y=key, title=f"sdgraph tune: {len(records)} trials, Pareto front",
                        x_label="s / image", y_label=key.replace("_min", " (worst image)"))
    write("front.svg", svg.replace(">", ">" + _SVG_STYLE, 1) + "\n")  # standalone: the report page's CSS inline
    trials_doc = {"storage": storage_url, "study": STUDY_NAME, "settings": {k: v for k, v in settings.items() if k != "work_dir"},
                  "space": space.describe(), "budget": dataclasses.asdict(budget), "primary": key, "front": front,
                  "chosen": chosen["number"] if chosen else None, "trials": records}
    write("trials.json", json.dumps(trials_doc, indent=2, default=str) + "\n")
    if chosen:
        write("recipe.yaml", recipe_text(chosen["config"], settings, {
            "study": str(shown), "trial": chosen["number"], "budget": budget.describe(),
            "e2e_s": chosen["metrics"]["e2e_s"], "metrics": {k: v for k, v in chosen["metrics"].items() if k != "e2e_s"},
            "graph_sha256": chosen.get("graph_sha256", {})}))
    elif (final / "recipe.yaml").exists():
        (final / "recipe.yaml").unlink()  # the study's own file: a stale pick must not outlive its budget
    result = TuneResult(final, storage_url, records, front, chosen, budget, files, list(space.notes))
    write("summary.json", json.dumps(result.summary(), indent=2) + "\n")
    return result


def closest_line(result: TuneResult) -> str:
    """The error line when no trial meets the budget, naming the closest trial."""
    done = [r for r in result.trials if r["state"] == "complete"]
    if not done:
        states = {}
        for r in result.trials:
            states[r["state"]] = states.get(r["state"], 0) + 1
        first = next((r for r in result.trials if r.get("error")), None)
        why = f"; first error: trial {first['number']}: {first['error']}" if first else ""
        return (f"no trial completed ({', '.join(f'{v} {k}' for k, v in states.items()) or 'none ran'}){why}")
    best = min(done, key=lambda r: (result.budget.shortfall(r.get("metrics", {})), r["metrics"].get("e2e_s", math.inf)))
    return (f"no trial meets the budget ({result.budget.describe()}); closest: trial {best['number']} "
            f"({_label(best['config'])}): {'; '.join(best['fails'])}")

