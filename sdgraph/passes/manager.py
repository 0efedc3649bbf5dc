"""Run a pipeline of passes: structural checks between passes, numeric verification, rollback."""

from __future__ import annotations

import collections
import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import onnx_graphsurgeon as gs

from sdgraph.errors import InputError, PassError, SdgraphError, VerificationError
from sdgraph.ir.model import Model
from sdgraph.passes.base import Pass
from sdgraph.passes.pipeline import build_pipeline, format_pipeline

__all__ = [
    "PassManager",
    "PassRecord",
    "Report",
    "Instrument",
    "DumpDir",
    "PrintAfter",
    "verify_structure",
    "optimize_path",
]

log = logging.getLogger(__name__)


# -- structural verifier ----------------------------------------------------------------------
def verify_structure(model: Model, expected_outputs: list[str] | None = None) -> None:
    """Cheap checks: acyclic, unique node names, no dangling tensors, graph outputs intact."""
    graph = model.graph
    try:
        graph.toposort()
    except Exception as exc:
        raise PassError(f"graph is not a DAG after the pass: {exc}".splitlines()[0]) from None
    names = collections.Counter(n.name for n in graph.nodes if n.name)
    dup = [n for n, c in names.items() if c > 1]
    if dup:
        raise PassError(f"duplicate node names: {', '.join(sorted(dup)[:5])}")
    graph_inputs = {t.name for t in graph.inputs}
    producers: dict[str, int] = collections.Counter()
    for node in graph.nodes:
        for out in node.outputs:
            producers[out.name] += 1
    multi = [n for n, c in producers.items() if c > 1]
    if multi:
        raise PassError(f"tensors with more than one producer: {', '.join(sorted(multi)[:5])}")
    for node in graph.nodes:
        for t in node.inputs:
            if isinstance(t, gs.Constant) or t.name == "" or t.name in graph_inputs or t.name in producers:
                continue
            raise PassError(f"node {node.name!r} ({node.op}) reads {t.name!r}, which nothing produces")
    outs = [t.name for t in graph.outputs]
    if expected_outputs is not None and outs != expected_outputs:
        raise PassError(f"graph outputs changed: {expected_outputs} -> {outs}")
    for t in graph.outputs:
        if t.name not in producers and t.name not in graph_inputs:
            raise PassError(f"graph output {t.name!r} is no longer produced")


# -- instruments ------------------------------------------------------------------------------
class Instrument:
    """Hooks around each pass (TVM's PassInstrument): timing, dumps, printing."""

    def before_pass(self, index: int, p: Pass, model: Model) -> None:
        pass

    def after_pass(self, index: int, p: Pass, model: Model, record: "PassRecord") -> None:
        pass


class DumpDir(Instrument):
    """Write the graph after each pass as ``NNN_<pass>.onnx`` (``000_input.onnx`` first)."""

    def __init__(self, directory: str | Path, force: bool = False, inputs: Iterable[Path] = ()):
        from sdgraph.ir.outputs import guard_output

        self.directory = Path(directory)
        guard_output(self.directory, list(inputs), force=force, what="dump folder")
        self.written: list[Path] = []

    def before_pass(self, index: int, p: Pass, model: Model) -> None:
        if index == 1:
            self._write(model, f"000_input.onnx")

    def after_pass(self, index: int, p: Pass, model: Model, record: "PassRecord") -> None:
        self._write(model, f"{index:03d}_{p.name}.onnx")

    def _write(self, model: Model, filename: str) -> None:
        created = not self.directory.exists()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"{self.directory}: cannot create dump directory ({exc.strerror})") from None
        out = self.directory / filename
        m = model.copy()
        m.path = None
        try:
            m.save(out, force=True)  # the folder was guarded when the run started
        except BaseException:
            if created and not any(self.directory.iterdir()):
                self.directory.rmdir()  # leave no empty folder behind a failed first dump
            raise
        self.written.append(out)


class PrintAfter(Instrument):
    """Send a text view of the graph after the named passes (all when ``names`` is empty)."""

    def __init__(self, sink: Callable[[str], None], names: Iterable[str] = ()):
        self.sink = sink
        self.names = set(names)

    def after_pass(self, index: int, p: Pass, model: Model, record: "PassRecord") -> None:
        if self.names and p.name not in self.names:
            return
        self.sink(f"// after {index:03d} {p.spec()}\n{graph_text(model)}")


def graph_text(model: Model, limit: int = 400) -> str:
    """A compact printed graph: one line per node, ``outs = op(ins)``."""
    lines = [f"graph {model.name} ({model.num_nodes()} nodes)"]
    for i, node in enumerate(model.graph.nodes):
        if i == limit:
            lines.append(f"  ... {model.num_nodes() - limit} more nodes")
            break
        ins = ", ".join("%" + t.name if not isinstance(t, gs.Constant) else f"const{list(t.shape or [])}" for t in node.inputs)
        outs = ", ".join("%" + t.name for t in node.outputs)
        dom = f"{node.domain}::" if node.domain else ""
        lines.append(f"  {outs} = {dom}{node.op}({ins})")
    return "\n".join(lines)


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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- the manager ------------------------------------------------------------------------------
class PassManager:
    """Runs passes in order on a Model, in place.

    Between passes the structural verifier always runs. With ``verify=True`` the graph is run in
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
        self.instruments = list(instruments)
        for p in self.passes:
            p.debug = debug

    @property
    def pipeline(self) -> str:
        return format_pipeline(self.passes)

    def run(self, model: Model) -> Report:
        from sdgraph.ir import runtime

        report = Report(self.pipeline, model.name, model.role, ops_before=dict(model.op_histogram()))
        t_start = time.perf_counter()
        expected_outputs = [t.name for t in model.graph.outputs]
        feeds = reference = previous = None
        if self.verify:
            feeds = runtime.seeded_inputs(model, self.seed, self.shapes)
            reference = previous = runtime.run(model, feeds)
        done: list[str] = []
        for index, p in enumerate(self.passes, start=1):
            rec = PassRecord(index, p.spec(), p.name, p.exact, nodes_before=model.num_nodes())
            report.records.append(rec)
            if p.roles is not None and model.role not in p.roles:
                rec.skipped = f"applies to {', '.join(p.roles)}, not {model.role}"
                rec.nodes_after = rec.nodes_before
                continue
            for inst in self.instruments:
                inst.before_pass(index, p, model)
            before_ops = model.op_histogram()
            snapshot = model.copy()
            t0 = time.perf_counter()
            try:
                result = p(model)  # requires -> run -> result check -> ensures
                verify_structure(model, expected_outputs)
            except SdgraphError as exc:
                _restore(model, snapshot)
                raise type(exc)(_failed(index, p, done, str(exc))) from None
            except Exception as exc:  # a bug in a pass must not leave a half-rewritten graph
                _restore(model, snapshot)
                log.debug("pass %s raised", p.name, exc_info=True)
                raise PassError(_failed(index, p, done, f"{type(exc).__name__}: {exc}".splitlines()[0])) from None
            rec.seconds = time.perf_counter() - t0
            rec.modified = result.modified
            rec.stats = dict(result.stats)
            rec.expected, rec.matched = result.expected, result.matched
            rec.near_misses = list(result.near_misses)
            rec.notes = list(result.notes)
            rec.nodes_after = model.num_nodes()
            after_ops = model.op_histogram()
            rec.ops_delta = {k: after_ops.get(k, 0) - before_ops.get(k, 0) for k in set(before_ops) | set(after_ops)
                             if after_ops.get(k, 0) != before_ops.get(k, 0)}
            if self.strict and p.pattern and rec.expected is not None and (rec.matched or 0) < rec.expected:
                _restore(model, snapshot)
                raise VerificationError(_failed(
                    index, p, done,
                    f"--strict: matched {rec.matched or 0} of {rec.expected} expected regions"
                    + (f" (first near miss: {rec.near_misses[0][0]}: {rec.near_misses[0][1]})" if rec.near_misses else ""),
                ))
            if self.verify and result.modified:
                try:
                    outputs = _run_after(p, model, feeds)
                except SdgraphError as exc:
                    _restore(model, snapshot)
                    raise VerificationError(_failed(index, p, done, f"graph no longer runs: {exc}")) from None
                rec.numbers = runtime.worst(runtime.compare(previous, outputs))
                problem = _judge(p, rec.numbers)
                if problem:
                    _restore(model, snapshot)
                    raise VerificationError(_failed(index, p, done, problem))
                previous = outputs
            for inst in self.instruments:
                inst.after_pass(index, p, model, rec)
            done.append(p.spec())
        if self.verify and previous is not reference:
            report.numbers = runtime.worst(runtime.compare(reference, previous))
        report.seconds = time.perf_counter() - t_start
        report.ops_after = dict(model.op_histogram())
        return report


def _run_after(p: Pass, model: Model, feeds) -> dict:
    """ONNX Runtime; for an approximate pass whose graph ORT's CPU provider cannot load (bf16), OpenVINO."""
    from sdgraph.ir import runtime

    try:
        return runtime.run(model, feeds)
    except InputError:
        if p.exact:
            raise
        from sdgraph.passes._precision import run_any

        return run_any(model, feeds, runtime="openvino")[0]


def _judge(p: Pass, numbers: dict[str, float]) -> str | None:
    if numbers["cosine"] != numbers["cosine"]:  # NaN
        return "outputs are NaN/Inf after the pass"
    min_cos = getattr(p.opts, "min_cosine", None)
    if p.exact:
        if numbers["max_rel"] > p.rtol:
            return f"outputs moved by max_rel {numbers['max_rel']:.3g} (> {p.rtol:g}), cosine {numbers['cosine']:.6f}"
    elif min_cos is not None and numbers["cosine"] < float(min_cos):
        return f"cosine {numbers['cosine']:.6f} is below min_cosine={min_cos}"
    return None


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
    from sdgraph.ir import io, outputs
    from sdgraph.manifest import SUBMODELS, read_manifest, write_manifest

    src, out = Path(src), Path(out)
    outputs.guard_output(out, outputs.model_inputs(src), force=force)
    pm = PassManager(passes, **manager_kwargs)
    model_dir = src.is_dir() and not (src / "model.onnx").is_file() and any((src / s / "model.onnx").is_file() for s in SUBMODELS)
    if not model_dir:
        model = Model.load(src)
        report = pm.run(model)
        model.save(out, force=force)
        return {model.name: report}
    wanted = set(submodels) if submodels else None
    reports: dict[str, Report] = {}
    with io.atomic_dir(out, force=force) as tmp:
        for item in sorted(src.iterdir()):
            if item.name in SUBMODELS and (item / "model.onnx").is_file():
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            elif item.name != "sdgraph.json":
                shutil.copy2(item, tmp / item.name)
        for name in SUBMODELS:
            f = src / name / "model.onnx"
            if not f.is_file():
                continue
            model = Model.load(f)
            if wanted is None or name in wanted:
                model.metadata.setdefault("sdgraph.role", name)
                reports[name] = PassManager(pm.passes, verify=pm.verify, strict=pm.strict, debug=pm.debug,
                                            seed=pm.seed, shapes=pm.shapes, instruments=pm.instruments).run(model)
            (tmp / name).mkdir()
            model.save_to_dir_unchecked(tmp / name)
        manifest = read_manifest(src)
        history = list(manifest.get("passes", []))
        history.append({"pipeline": pm.pipeline, "submodels": {k: _summary(r) for k, r in reports.items()}})
        manifest["passes"] = history
        write_manifest(tmp, manifest)
    return reports


def _summary(r: Report) -> dict[str, Any]:
    return {
        "records": [{"pass": x.spec, "modified": x.modified, "stats": x.stats, "skipped": x.skipped,
                     "expected": x.expected, "matched": x.matched, "numbers": x.numbers} for x in r.records],
        "nodes_before": sum(r.ops_before.values()),
        "nodes_after": sum(r.ops_after.values()),
        "numbers": r.numbers,
    }
