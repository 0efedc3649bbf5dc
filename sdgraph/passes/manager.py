"""Run a pipeline of passes: the loop, with rollback. Checks live in ``verifier``, hooks in ``instruments``."""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Iterable

from sdgraph.errors import InputError, PassError, SdgraphError, UsageError, VerificationError
from sdgraph.ir.model import Model
from sdgraph.passes.base import Pass
from sdgraph.passes.instruments import DumpDir, Instrument, PrintAfter, RoleGate, Timing
from sdgraph.passes.pipeline import build_pipeline, format_pipeline
from sdgraph.passes.verifier import check_input, first_line, judge, run_after, verify_structure

__all__ = [
    "PassManager",
    "PassRecord",
    "Report",
    "Instrument",  # re-exported from instruments / verifier for existing callers
    "DumpDir",
    "PrintAfter",
    "verify_structure",
    "optimize_path",
]

log = logging.getLogger(__name__)


# -- records and report -----------------------------------------------------------------------
@dataclasses.dataclass
class PassRecord:
    index: int
    spec: str
    name: str
    exact: bool
    modified: bool = False
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    expected: int | None = None
    matched: int | None = None
    nodes_before: int = 0
    nodes_after: int = 0
    ops_delta: dict[str, int] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    skipped: str | None = None
    numbers: dict[str, float] | None = None  # vs the graph before this pass
    near_misses: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Report:
    pipeline: str
    model: str
    role: str
    records: list[PassRecord] = dataclasses.field(default_factory=list)
    ops_before: dict[str, int] = dataclasses.field(default_factory=dict)
    ops_after: dict[str, int] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    numbers: dict[str, float] | None = None  # final graph vs the input graph
    # variant graphs passes made (name -> manifest entry, with "report": the passes run on it after)
    variants: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    schedule: dict[str, Any] | None = None  # the per-step schedule a pass set (sdgraph.schedule)

    def __post_init__(self):
        self.variant_models: dict[str, Model] = {}  # not a field: to_dict() never copies graphs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- the manager ------------------------------------------------------------------------------
class PassManager:
    """Runs passes in order on a Model, in place.

    Each pass runs through its own contract (``Pass.__call__``); between passes the structural
    verifier always runs. Instruments gate (roles), time, dump and print around each pass. With ``verify=True`` the graph is run in
    ONNX Runtime (graph optimizations off) before and after each pass on the same seeded inputs;
    an exact pass whose outputs move more than its tolerance is rolled back and named, with the
    passes that ran before it. Approximate passes report their error and fail only below an
    explicit ``min_cosine`` option. ``strict=True`` fails a pattern pass that left expected
    regions unmatched.
    """

    def __init__(
        self,
        passes: "str | list",
        *,
        verify: bool = False,
        strict: bool = False,
        debug: bool = False,
        seed: int = 0,
        shapes: dict[str, tuple] | None = None,
        instruments: Iterable[Instrument] = (),
    ):
        self.passes = build_pipeline(passes)
        self.verify = verify
        self.strict = strict
        self.debug = debug
        self.seed = seed
        self.shapes = shapes
        self.instruments = list(instruments)  # the caller's; the role gate and timer are always added
        for p in self.passes:
            p.debug = debug

    @property
    def pipeline(self) -> str:
        return format_pipeline(self.passes)

    def run(self, model: Model) -> Report:
        from sdgraph.ir import runtime

        report = Report(self.pipeline, model.name, model.role, ops_before=dict(model.op_histogram()))
        t_start = time.perf_counter()
        check_input(model)
        expected_outputs = [t.name for t in model.graph.outputs]
        feeds = reference = previous = None
        if self.verify:
            feeds = runtime.seeded_inputs(model, self.seed, self.shapes)
            try:
                reference = previous = runtime.run(model, feeds)
            except Exception as exc:
                raise InputError(f"--verify: {model.name} does not run in ONNX Runtime before any pass: "
                                 f"{first_line(exc)}") from None
        done: list[str] = []
        instruments = [RoleGate(), *self.instruments, Timing()]
        for index, p in enumerate(self.passes, start=1):
            rec = PassRecord(index, p.spec(), p.name, p.exact, nodes_before=model.num_nodes())
            report.records.append(rec)
            rec.skipped = next((why for inst in instruments if (why := inst.should_run(index, p, model))), None)
            if rec.skipped:
                rec.nodes_after = rec.nodes_before
                continue
            before_ops = model.op_histogram()
            snapshot = model.copy()
            for inst in instruments:
                inst.before_pass(index, p, model)
            try:
                result = p(model)  # requires -> run -> result check -> ensures
                verify_structure(model, expected_outputs + [n for n in result.new_outputs if n not in expected_outputs])
            except SdgraphError as exc:
                _restore(model, snapshot)
                raise type(exc)(_failed(index, p, done, str(exc))) from None
            except Exception as exc:  # a bug in a pass must not leave a half-rewritten graph
                _restore(model, snapshot)
                log.debug("pass %s raised", p.name, exc_info=True)
                raise PassError(_failed(index, p, done, f"{type(exc).__name__}: {exc}".splitlines()[0])) from None
            rec.modified = result.modified
            rec.stats = dict(result.stats)
            rec.expected, rec.matched = result.expected, result.matched
            rec.near_misses = list(result.near_misses)
            rec.notes = list(result.notes)
            rec.nodes_after = model.num_nodes()
            after_ops = model.op_histogram()
            rec.ops_delta = {k: after_ops.get(k, 0) - before_ops.get(k, 0) for k in set(before_ops) | set(after_ops)
                             if after_ops.get(k, 0) != before_ops.get(k, 0)}
            for inst in instruments:
                inst.after_run(index, p, model, rec)
            if self.strict and p.pattern and rec.expected is not None and (rec.matched or 0) < rec.expected:
                _restore(model, snapshot)
                raise VerificationError(_failed(
                    index, p, done,
                    f"--strict: matched {rec.matched or 0} of {rec.expected} expected regions"
                    + (f" (first near miss: {rec.near_misses[0][0]}: {rec.near_misses[0][1]})" if rec.near_misses else ""),
                ))
            if self.verify and result.modified:
                try:
                    outputs = run_after(p, model, feeds)
                except PassError as exc:
                    _restore(model, snapshot)
                    raise VerificationError(_failed(index, p, done, f"the graph no longer runs: {exc}")) from None
                rec.numbers = runtime.worst(runtime.compare(previous, outputs))
                problem = judge(p, rec.numbers)
                if problem:
                    _restore(model, snapshot)
                    raise VerificationError(_failed(index, p, done, problem))
                previous = outputs
            for inst in instruments:
                inst.after_pass(index, p, model, rec)
            done.append(p.spec())
            expected_outputs += [n for n in result.new_outputs if n not in expected_outputs]
            self._take_variants(report, index, result, model, feeds)
        if self.verify and previous is not reference:
            report.numbers = runtime.worst(runtime.compare(reference, previous))
        report.seconds = time.perf_counter() - t_start
        report.ops_after = dict(model.op_histogram())
        return report


    def _take_variants(self, report: Report, index: int, result, model: Model, feeds) -> None:
        """Keep the variant graphs and schedule a pass made; the passes after it run on each variant too."""
        from sdgraph.schedule import feature_shape

        if result.schedule is not None:
            report.schedule = dict(result.schedule)
        rest = self.passes[index:]
        for name, variant in result.variants.items():
            entry = dict(variant.entry)
            if rest:
                shapes = dict(self.shapes or {})
                feat = entry.get("feature")
                if isinstance(feat, dict) and feeds is not None:
                    sample = feeds.get("sample")
                    if sample is not None:
                        shapes[feat["input"]] = feature_shape(sample.shape, feat)
                sub = PassManager(rest, verify=self.verify, strict=self.strict, debug=self.debug, seed=self.seed,
                                  shapes=shapes or None, instruments=self.instruments)
                entry["report"] = _summary(sub.run(variant.model))
            report.variants[name] = entry
            report.variant_models[name] = variant.model


def _failed(index: int, p: Pass, done: list[str], why: str) -> str:
    before = ",".join(done) if done else "none"
    return f"pass {index} '{p.spec()}' failed and was rolled back: {why} (passes before it: {before})"


def _restore(model: Model, snapshot: Model) -> None:
    model.assign(snapshot)


# -- files and model directories --------------------------------------------------------------
def optimize_path(
    src: str | Path,
    passes: "str | list",
    out: str | Path,
    *,
    submodels: Iterable[str] | None = None,
    force: bool = False,
    **manager_kwargs: Any,
) -> dict[str, Report]:
    """Optimize one model file, or every submodel of a model directory, into ``out``.

    A model directory's other files (tokenizer, scheduler, manifest) are copied; the manifest
    gains the passes applied with their stats. Inputs are never modified; ``out`` is written
    atomically; an existing non-empty ``out`` is replaced only with ``force``.
    """
    from sdgraph.ir import outputs
    from sdgraph.ir.modeldir import ModelDir
    from sdgraph.shape_spec import check_shape_names, input_dims, shapes_for

    src, out = Path(src), Path(out)
    outputs.guard_output(out, outputs.model_inputs(src), force=force)
    shapes = manager_kwargs.pop("shapes", None) or {}
    pm = PassManager(passes, **manager_kwargs)
    if shapes and not pm.verify:
        raise UsageError("--shape sets the inputs of --verify; add --verify (or drop --shape)")
    if not ModelDir.is_model_dir(src):
        if submodels:
            raise UsageError("--submodels applies to a model directory, not to a single model file")
        model = Model.load(src)
        check_shape_names([shapes], {model.role: input_dims(model)})
        pm.shapes = shapes_for(shapes, model.role, input_dims(model)) or None
        report = pm.run(model)
        if report.variants:
            raise UsageError(f"{', '.join(sorted(report.variants))}: a pass made variant graphs, which live in a model "
                             f"directory: optimize the directory that holds {src} instead of the file")
        model.save(out, force=force)
        return {model.name: report}
    mdir = ModelDir(src)
    wanted = set(mdir.select(list(submodels) if submodels else None))
    # load (and check) every submodel before any work: a bad one is refused before the first pass
    models = {name: Model.load(mdir.model_path(name)) for name in mdir.submodels}
    wanted |= {name for name, of in mdir.variants.items() if name in models and of in wanted}  # variants get their submodel's passes
    check_shape_names([shapes], {name: input_dims(m) for name, m in models.items() if name in wanted})
    reports: dict[str, Report] = {}
    with ModelDir.create(out, force=force) as new:
        mdir.copy_assets_to(new.path)
        for name, model in models.items():
            if name in wanted:
                model.metadata.setdefault("sdgraph.role", name)
                reports[name] = PassManager(pm.passes, verify=pm.verify, strict=pm.strict, debug=pm.debug, seed=pm.seed,
                                            shapes=shapes_for(shapes, name, input_dims(model)) or None,
                                            instruments=pm.instruments).run(model)
            (new.path / name).mkdir()
            model.save_to_dir_unchecked(new.path / name)
        manifest = copy.deepcopy(mdir.manifest)
        _write_variants(new.path, manifest, reports)
        history = list(manifest.get("passes", []))
        history.append({"pipeline": pm.pipeline, "submodels": {k: _summary(r) for k, r in reports.items()}})
        manifest["passes"] = history
        new.write_manifest(manifest)
    return reports


def _write_variants(tmp: Path, manifest: dict[str, Any], reports: dict[str, Report]) -> None:
    """Each variant a pass made becomes a sibling folder; the manifest names it and the schedule."""
    for base, report in reports.items():
        for name, model in report.variant_models.items():
            if (tmp / name).exists():
                raise UsageError(f"a pass made the variant {name!r} of {base}, and the model dir already has {name}/")
            (tmp / name).mkdir()
            model.metadata = dict(model.metadata, **{"sdgraph.role": base})
            model.save_to_dir_unchecked(tmp / name)
            entry = {k: v for k, v in report.variants[name].items() if k != "report"}
            manifest.setdefault("variants", {})[name] = {"of": base, **entry}
        if report.schedule is not None:
            manifest.setdefault("schedule", {})[base] = report.schedule


def _summary(r: Report) -> dict[str, Any]:
    return {
        "records": [{"pass": x.spec, "modified": x.modified, "stats": x.stats, "skipped": x.skipped,
                     "expected": x.expected, "matched": x.matched, "numbers": x.numbers} for x in r.records],
        "nodes_before": sum(r.ops_before.values()),
        "nodes_after": sum(r.ops_after.values()),
        "numbers": r.numbers,
        **({"variants": {k: v.get("report") for k, v in r.variants.items()}} if r.variants else {}),
    }
