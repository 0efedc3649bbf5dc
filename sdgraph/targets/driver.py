"""Lowering driver: check every submodel before any work, legalize, build, cache, write the artifact; load it back."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from sdgraph.errors import InputError, UnsupportedError, UsageError
from sdgraph.ir import io
from sdgraph.ir.model import CANONICAL_DOMAIN, ROLES, Model
from sdgraph.passes._cast import apply_cast_mode, recorded_precision_mode
from sdgraph.ir.modeldir import ModelDir
from sdgraph.manifest import read_manifest
from sdgraph.progress import track
from sdgraph.targets.base import ARTIFACT_KIND, LowerContext, Problem, Target, get_target
from sdgraph.shape_spec import (check_shape_names, derive_shapes, input_dims, normalize_shapes, parse_shape_args,
                                 parse_shape_spec, shapes_for, size_hint, with_defaults)
from sdgraph.targets.cache import ArtifactCache, cache_max_bytes, graph_hash

__all__ = ["lower", "load_artifact", "LowerResult", "Artifact", "parse_shape_spec", "parse_shape_args", "generic_problems",
           "normalize_shapes", "bucket_for"]

log = logging.getLogger(__name__)

_NP_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16", np.dtype(np.float64): "float64",
             np.dtype(np.int64): "int64", np.dtype(np.int32): "int32", np.dtype(np.int8): "int8",
             np.dtype(np.uint8): "uint8", np.dtype(np.bool_): "bool"}


@dataclasses.dataclass
class LowerResult:
    """What ``lower`` did: the artifact folder, and per submodel whether the cache hit and why not."""

    out: Path
    target: str
    precision: str
    submodels: dict[str, dict[str, Any]]
    manifest: dict[str, Any]
    seconds: float
    dry_run: bool = False  # nothing was built or written: ``submodels`` is the plan

    def cache_line(self, name: str) -> str:
        s = self.submodels[name]
        return "cache hit" if s["cache"] == "hit" else f"cache {s['cache']}: {s.get('reason', '')}".rstrip(": ")


# -- shapes (the --shape text itself: sdgraph.shape_spec) -----------------------------------------
def _buckets_for(model: Model, buckets: list[dict[str, tuple[int, ...]]], name: str) -> list[dict[str, tuple[int, ...]]]:
    """The buckets restricted to this submodel's inputs (qualified ``name:input`` or bare names that fit)."""
    dims = input_dims(model)
    out = []
    for b in buckets:
        sub = shapes_for(b, name, dims)
        if sub and sub not in out:
            out.append(sub)
    return out


def bucket_for(feeds: Mapping[str, np.ndarray], buckets: list[Mapping[str, Iterable[int]]]) -> int | None:
    """Index of the declared bucket the feeds' shapes match, or None."""
    for i, b in enumerate(buckets):
        if all(k not in feeds or tuple(np.shape(feeds[k])) == tuple(v) for k, v in b.items()):
            return i
    return None


def _fmt_bucket(b: Mapping[str, Iterable[int]]) -> str:
    return ",".join(f"{k}={'x'.join(map(str, v))}" for k, v in b.items())


# -- the check before any work -------------------------------------------------------------------
def generic_problems(model: Model, target: Target, ctx: LowerContext) -> list[Problem]:
    """Checks every target shares: op domains, dtypes, static shapes, canonical ops it cannot take."""
    cap = target.capability
    problems: list[Problem] = []
    fn_keys = set(model.functions)
    for t in list(model.graph.inputs) + list(model.graph.outputs):
        if t.dtype is None:
            continue
        dn = _NP_NAMES.get(np.dtype(t.dtype), str(np.dtype(t.dtype)))
        if dn not in cap.dtypes:
            problems.append(Problem(t.name, "graph input" if t in model.graph.inputs else "graph output",
                                    f"dtype {dn} is not accepted by {target.name} (accepts {', '.join(sorted(cap.dtypes))})",
                                    "cast the graph to a supported dtype before lowering"))
    if cap.static_shapes:
        declared = {k for b in ctx.shapes for k in b}
        for t in model.graph.inputs:
            dynamic = t.shape is None or any(not isinstance(d, (int, np.integer)) or d < 0 for d in t.shape)
            if dynamic and t.name not in declared:
                problems.append(Problem(t.name, "graph input", f"{target.name} needs static shapes and {t.name!r} has dims {t.shape}",
                                        f"declare a bucket: --shape {t.name}=..."))
    for node in model.graph.nodes:
        domain = node.domain or ""
        op = node.op if domain in ("", "ai.onnx") else f"{domain}::{node.op}"
        if domain == CANONICAL_DOMAIN:
            if node.op not in cap.canonical_ops and (domain, node.op) not in fn_keys:
                problems.append(Problem(node.name, op, "canonical op without a function body, and no native lowering here",
                                        "re-run the pass that made it, or inline it"))
        elif domain not in ("", "ai.onnx") and (domain, node.op) not in fn_keys:
            if cap.ops is not None and op not in cap.ops:
                problems.append(Problem(node.name, op, f"op of domain {domain!r} is not supported by {target.name}"))
        elif cap.ops is not None and domain in ("", "ai.onnx") and node.op not in cap.ops:
            problems.append(Problem(node.name, op, f"not supported by {target.name}"))
    return problems


# -- inputs -------------------------------------------------------------------------------------
def _source_manifest(src: Path, mdir: ModelDir | None) -> dict[str, Any]:
    if mdir is not None:
        return mdir.manifest
    f = io.resolve_model_file(src)
    for d in (f.parent, f.parent.parent):
        m = read_manifest(d)
        if m:
            return m
    return {}


def _pipeline_text(manifest: Mapping[str, Any]) -> str:
    return " | ".join(str(p.get("pipeline", "")) for p in manifest.get("passes", []) if isinstance(p, Mapping))


_QUANT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger",
                        "ConvInteger", "DynamicQuantizeLinear"})


_FLOAT_NAMES = {"float16": "fp16", "float32": "fp32", "bfloat16": "bf16"}


def _dtype_name(dtype) -> str:
    """A constant's element type by name; onnx-graphsurgeon leaves types numpy lacks (bfloat16 read back
    from disk) as the ONNX enum value."""
    if isinstance(dtype, (int, np.integer)):
        return {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.FLOAT: "float32",
                onnx.TensorProto.BFLOAT16: "bfloat16"}.get(int(dtype), onnx.TensorProto.DataType.Name(int(dtype)).lower())
    return np.dtype(dtype).name


def graph_precision(model: Model) -> str:
    """The precision a graph carries: ``int8`` (quantize/dequantize nodes), ``fp16``/``bf16`` (most of its
    float weights), else ``fp32``."""
    if any(n.op in _QUANT_OPS for n in model.graph.nodes):
        return "int8"
    recorded = recorded_precision_mode(model)  # bf16{mode=target}: a float32 graph meant to run in bf16
    if recorded is not None:
        return recorded[0]
    sizes: dict[str, int] = {}
    for t in model.graph.tensors().values():
        if isinstance(t, gs.Constant) and t.dtype is not None:
            name = _FLOAT_NAMES.get(_dtype_name(t.dtype))
            if name:
                sizes[name] = sizes.get(name, 0) + int(np.prod(t.shape or [1]))
    return max(sizes, key=sizes.get) if sizes else "fp32"


def submodel_precision(requested: str | None, own: str, takes: tuple[str, ...], any_int8: bool) -> str:
    """The precision one submodel lowers at, each in its own where the request allows (the OpenVINO
    SDXL-Turbo seed: an INT8 UNet beside fp16/fp32 text encoders and VAE).

    A quantized graph stays ``int8`` (when the target takes it); ``int8`` or no request keeps each
    other submodel at its own precision (fp32 where the target does not take that one); any other
    request applies to every non-quantized submodel. ``int8`` asked of a directory with no quantized
    graph stays ``int8`` for the target to refuse with its reason.
    """
    if own == "int8" and "int8" in takes:
        return "int8"
    if requested == "int8" and not any_int8:
        return "int8"
    if requested is None or requested == "int8":
        return own if own in takes and own != "int8" else "fp32"
    return requested


def _precision_mode(m: Model, tgt: Target, ctx: LowerContext, requested: str | None) -> None:
    """A recorded precision mode (``bf16{mode=target}``): the target's own mode with the keep list, or,
    for a target without one, the cast graph now (unless another precision was asked for)."""
    recorded = recorded_precision_mode(m)
    if recorded is None:
        return
    prec, keep, named = recorded
    if ctx.precision == prec and tgt.supports_precision_mode(prec):
        ctx.precision_keep, ctx.precision_named = tuple(keep), tuple(named)
    elif requested in (None, prec):
        stats = apply_cast_mode(m, prec, keep)
        log.info("%s: %s has no %s mode: cast graph (%s)", ctx.submodel, tgt.name, prec, stats)


def _say(progress: Callable[[str], None] | None, msg: str) -> None:
    log.info(msg)
    if progress is not None:
        progress(msg)


# -- lower --------------------------------------------------------------------------------------
def lower(
    src,
    target: str,
    out,
    precision: str | None = None,
    shapes=None,
    options: Mapping[str, Any] | None = None,
    submodels: Iterable[str] | None = None,
    cache: bool = True,
    progress: Callable[[str], None] | None = None,
    cache_dir: str | Path | None = None,
    force: bool = False,
    height: int | None = None,
    width: int | None = None,
    batch: int | None = None,
    dry_run: bool = False,
    annotations: Mapping[str, Any] | None = None,
) -> LowerResult:
    """Lower a model file or a model directory to ``target`` into the artifact folder ``out``.

    Every submodel is checked before any work; all problems are reported together
    (``UnsupportedError.problems``). ``out`` is written atomically, inputs are never touched; an
    existing non-empty ``out`` is replaced only with ``force``.
    ``shapes``: buckets of ``[submodel:]input -> dims`` (``sdgraph.shape_spec``); ``height``/``width``/
    ``batch`` derive the shapes of every symbolic dim the buckets leave open (UNet at the CFG batch).
    ``precision`` None lowers each submodel at its own precision; see :func:`submodel_precision`
    (the manifest records each submodel's, and ``mixed`` at the top when they differ).
    ``dry_run``: every check above runs, then nothing is built or written; the result's ``submodels``
    say per submodel the precision, shapes and the cache decision (``hit`` or ``miss`` with why).
    ``annotations``: extra top-level keys of the artifact's manifest (``build`` names its recipe there).
    """
    from sdgraph.ir import outputs

    t0 = time.perf_counter()
    tgt = get_target(target)
    tgt.require()
    opts = tgt.parse_options(dict(options or {}))
    if precision is not None and precision not in tgt.capability.precisions:
        raise UsageError(f"target {target!r} does not take precision {precision!r} (takes {', '.join(tgt.capability.precisions)})")
    buckets = normalize_shapes(shapes)
    src, out = Path(src), Path(out)
    if not src.exists():
        raise InputError(f"{src}: no such file or directory")
    outputs.guard_output(out, outputs.model_inputs(src), force=force)
    mdir = ModelDir(src) if ModelDir.is_model_dir(src) else None
    src_manifest = _source_manifest(src, mdir)
    pipeline = _pipeline_text(src_manifest)

    # 1. load every submodel and check it: all problems, before any work
    jobs: list[tuple[str, Model, LowerContext]] = []
    variants: dict[str, str] = {}  # variant folder -> the submodel it is a variant of (its shapes follow)
    if mdir is not None:
        for name in mdir.select(list(submodels) if submodels else None):
            m = Model.load(mdir.model_path(name))
            m.metadata.setdefault("sdgraph.role", name)
            jobs.append((name, m, None))
        variants = _variant_jobs(mdir, [name for name, _, _ in jobs], jobs)
    else:
        if submodels:
            raise UsageError("--submodels applies to a model directory, not to a single model file")
        m = Model.load(src)
        role = m.role
        jobs.append((role if role in ROLES else "model", m, None))
    signatures = {name: input_dims(m) for name, m, _ in jobs}
    check_shape_names(buckets, signatures)
    if height is not None or width is not None or batch is not None or tgt.capability.static_shapes:
        # symbolic dims left open get the shapes one image size and batch imply (static-shape targets need them)
        h, w, b = size_hint(buckets, signatures, src_manifest, height, width, batch)
        derived = derive_shapes(signatures, h, w, b, vae_scale=int(src_manifest.get("vae_scale_factor") or 8))
        buckets = with_defaults(buckets, derived, signatures)
    problems: list[str] = []
    own = {name: graph_precision(m) for name, m, _ in jobs}
    any_int8 = "int8" in own.values()
    base_shapes: dict[str, list] = {}
    for i, (name, m, _) in enumerate(jobs):
        prec = submodel_precision(precision, own[name], tgt.capability.precisions, any_int8)
        shapes_here = (_variant_buckets(m, base_shapes.get(variants[name], []), src_manifest, name) if name in variants
                       else _buckets_for(m, buckets, name))
        base_shapes[name] = shapes_here
        ctx = LowerContext(precision=prec, shapes=shapes_here, options=opts, role=m.role, submodel=name)
        _precision_mode(m, tgt, ctx, precision)
        jobs[i] = (name, m, ctx)
        found = generic_problems(m, tgt, ctx) + list(tgt.check(m, ctx))
        problems += [f"{name}: {p}" if len(jobs) > 1 or mdir is not None else str(p) for p in found]
    if problems:
        raise UnsupportedError(f"{len(problems)} problem(s) keep the graph from lowering to {target!r} (listed above)"
                               if len(problems) > 1 else f"cannot lower to {target!r}: {problems[0]}", problems)

    # 2. build each submodel (or restore it from the cache) into a temporary folder, then rename
    store = ArtifactCache(cache_dir, max_bytes=cache_max_bytes())
    cache_note = ""
    if cache and not store.usable():
        cache, cache_note = False, f"the cache folder {store.root} is not writable"
    tools = {"sdgraph": _version(), **tgt.tool_versions()}

    def key_components(m: Model, ctx: LowerContext, name: str) -> dict[str, Any]:
        return {
            "graph": graph_hash([m.path] + m.external_files(), store.root) if cache else "",
            "pipeline": pipeline,
            "target": target,
            "options": {k: v for k, v in sorted(opts.items())},
            "precision": ctx.precision,
            "shapes": [{k: list(v) for k, v in b.items()} for b in ctx.shapes],
            "tools": tools,
            "source": str(m.path.resolve()) if m.path else "",
            "role": name,
        }

    if dry_run:
        plan: dict[str, dict[str, Any]] = {}
        for name, m, ctx in jobs:
            components = key_components(m, ctx, name)
            if not cache:
                state, reason = "off", cache_note or "disabled (--no-cache)"
            else:
                hit, reason = store.lookup(target, components, peek=True)
                state = "hit" if hit is not None else "miss"
            plan[name] = {"cache": state, "reason": reason, "precision": ctx.precision,
                          "shapes": components["shapes"], "seconds": 0.0}
        precs = sorted({p["precision"] for p in plan.values()})
        return LowerResult(out=out, target=target, precision=precs[0] if len(precs) == 1 else "mixed",
                           submodels=plan, manifest={}, seconds=time.perf_counter() - t0, dry_run=True)
    results: dict[str, dict[str, Any]] = {}
    entries: dict[str, dict[str, Any]] = {}
    with ModelDir.create(out, force=force) as new:
        tmp = new.path
        if mdir is not None:
            mdir.copy_assets_to(tmp)
        for name, m, ctx in track(jobs, f"lower {target}"):
            t1 = time.perf_counter()
            sub = tmp / name
            sub.mkdir()
            components = key_components(m, ctx, name)
            with store.lock(target, components) if cache else contextlib.nullcontext():
                entry, state, reason = _restore_or_build(store, tgt, m, ctx, sub, target, components, cache, progress, name)
            if not cache and cache_note:
                reason = cache_note
            entry["files"] = {str(p.relative_to(sub)): p.stat().st_size for p in sorted(sub.rglob("*")) if p.is_file()}
            entry["shapes"] = components["shapes"]
            entry["graph_hash"] = components["graph"]
            entry["precision"] = ctx.precision
            entry["graph_precision"] = own[name]
            entry.setdefault("dynamic", True)
            entries[name] = entry
            results[name] = {"cache": state, "reason": reason, "seconds": round(time.perf_counter() - t1, 3)}
        precs = sorted({e["precision"] for e in entries.values()})
        precision = precs[0] if len(precs) == 1 else "mixed"
        manifest = {
            "kind": ARTIFACT_KIND,
            "sdgraph_version": _version(),
            "target": target,
            "precision": precision,
            "options": opts,
            "shapes": [{k: list(v) for k, v in b.items()} for b in buckets],
            "source": {"path": str(src.resolve()), "pipeline": pipeline, "kind": src_manifest.get("kind", "")},
            "source_manifest": {k: v for k, v in src_manifest.items() if k not in ("submodels",)},
            "tool_versions": tools,
            "submodels": entries,
            **_variant_manifest(src_manifest, variants),
            **dict(annotations or {}),
        }
        new.write_manifest(manifest)
    secs = time.perf_counter() - t0
    _say(progress, f"wrote {out} ({target}, {precision}) in {secs:.1f} s")
    return LowerResult(out=out, target=target, precision=precision, submodels=results, manifest=manifest, seconds=secs)


# -- UNet variants (deepcache's unet_shallow): lowered beside their submodel, shapes derived from it -------
def _variant_jobs(mdir: ModelDir, selected: list[str], jobs: list) -> dict[str, str]:
    """Append a job for each variant folder of a selected submodel (manifest ``"variants"``); name -> base."""
    found: dict[str, str] = {}
    for base in selected:
        for name in mdir.variants_of(base):
            f = mdir.model_path(name)
            if not f.is_file():
                raise InputError(f"{mdir.path}: the manifest names the variant {name!r} of {base} and {name}/model.onnx is missing")
            m = Model.load(f)
            m.metadata.setdefault("sdgraph.role", base)
            jobs.append((name, m, None))
            found[name] = base
    return found


def _variant_buckets(m: Model, base: list[dict[str, tuple[int, ...]]], manifest: Mapping[str, Any],
                     name: str) -> list[dict[str, tuple[int, ...]]]:
    """A variant's buckets: its base submodel's, plus the cached feature's dims derived from ``sample``."""
    from sdgraph.schedule import feature_shape

    entry = (manifest.get("variants") or {}).get(name) or {}
    feat = entry.get("feature") if isinstance(entry, Mapping) else None
    inputs = {t.name for t in m.graph.inputs}
    out = []
    for b in base:
        sub = {k: v for k, v in b.items() if k in inputs}
        if isinstance(feat, Mapping) and "sample" in b and feat.get("input") in inputs:
            sub[feat["input"]] = feature_shape(b["sample"], feat)
        out.append(sub)
    return out


def _variant_manifest(src_manifest: Mapping[str, Any], variants: Mapping[str, str]) -> dict[str, Any]:
    """The artifact's copy of the variants it lowered and the schedules over them."""
    if not variants:
        return {}
    out: dict[str, Any] = {"variants": {k: v for k, v in (src_manifest.get("variants") or {}).items() if k in variants}}
    sched = {k: v for k, v in (src_manifest.get("schedule") or {}).items() if k in set(variants.values())}
    if sched:
        out["schedule"] = sched
    return out


def _restore_or_build(store: ArtifactCache, tgt: Target, m: Model, ctx: LowerContext, sub: Path, target: str,
                      components: dict[str, Any], cache: bool, progress, name: str) -> tuple[dict[str, Any], str, str]:
    """One submodel: restore it from the cache (digests checked) or legalize and build it (then store it)."""
    hit, reason = (None, "disabled (--no-cache)") if not cache else store.lookup(target, components)
    if hit is not None:
        entry = store.restore(hit, sub)
        if entry is not None:
            _say(progress, f"{name}: cache hit ({hit.name[:12]})")
            return entry, "hit", ""
        reason = "entry corrupt (evicted)"
    _say(progress, f"{name}: cache {'off' if not cache else 'miss'}: {reason}; legalizing for {target}")
    tl = time.perf_counter()
    tgt.legalize(m, ctx)
    legal_s = time.perf_counter() - tl
    _say(progress, f"{name}: building {target} artifact")
    tb = time.perf_counter()
    entry = dict(tgt.build(m, sub, ctx))
    entry.setdefault("inputs", [t.name for t in m.graph.inputs])
    entry.setdefault("outputs", [t.name for t in m.graph.outputs])
    entry["timing"] = {"legalize_s": round(legal_s, 3), "build_s": round(time.perf_counter() - tb, 3)}
    if cache:
        store.store(target, components, sub, entry)
    return entry, "miss" if cache else "off", reason


def _version() -> str:
    from sdgraph._version import __version__

    return __version__


# -- load ---------------------------------------------------------------------------------------
class _ShapeGuard:
    """Wraps a runner: feeds at an undeclared shape run dynamically or fail naming the buckets."""

    def __init__(self, runner, name: str, buckets: list[dict[str, list[int]]], dynamic: bool):
        self.inner = runner
        self.name = name
        self.buckets = buckets
        self.dynamic = dynamic
        self.input_names = list(runner.input_names)
        self.output_names = list(runner.output_names)

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise InputError(f"{self.name}: missing input(s) {', '.join(missing)} (inputs: {', '.join(self.input_names)})")
        if self.buckets and bucket_for(feeds, self.buckets) is None:
            shown = _fmt_bucket({k: np.shape(v) for k, v in feeds.items() if any(k in b for b in self.buckets)})
            declared = " | ".join(_fmt_bucket(b) for b in self.buckets)
            if not self.dynamic:
                raise InputError(f"{self.name}: input shapes {shown} match no declared shape bucket (declared: {declared}); "
                                 "lower again with another --shape")
            log.info("%s: shapes %s are outside the declared buckets (%s); running dynamically", self.name, shown, declared)
        return self.inner(feeds)

    def __getattr__(self, item):
        return getattr(self.inner, item)


class Artifact:
    """A lowered artifact folder: ``.target``, ``.manifest``, ``.runners`` (loaded lazily), ``.runner(name)``."""

    def __init__(self, path: Path, manifest: dict[str, Any], target: Target, strict_shapes: bool | None):
        self.path = path
        self.manifest = manifest
        self.target = manifest["target"]
        self.target_impl = target
        self.precision = manifest.get("precision", "fp32")
        self.submodels = list(manifest["submodels"])
        self._strict = strict_shapes
        self._runners: dict[str, Any] = {}

    def runner(self, submodel: str | None = None):
        if submodel is None:
            if len(self.submodels) != 1:
                raise UsageError(f"{self.path}: name a submodel ({', '.join(self.submodels)})")
            submodel = self.submodels[0]
        if submodel not in self.manifest["submodels"]:
            raise UsageError(f"{self.path} has no submodel {submodel!r} (has {', '.join(self.submodels)})")
        if submodel not in self._runners:
            entry = self.manifest["submodels"][submodel]
            ctx = LowerContext(precision=entry.get("precision", self.precision), shapes=[{k: tuple(v) for k, v in b.items()} for b in entry.get("shapes", [])],
                               options=dict(self.manifest.get("options", {})), role=submodel, submodel=submodel)
            inner = self.target_impl.load(self.path / submodel, entry, ctx)
            dynamic = bool(entry.get("dynamic", True)) if self._strict is None else not self._strict
            self._runners[submodel] = _ShapeGuard(inner, submodel, entry.get("shapes", []), dynamic)
        return self._runners[submodel]

    @property
    def runners(self) -> dict[str, Any]:
        return {name: self.runner(name) for name in self.submodels}

    def __repr__(self) -> str:
        return f"Artifact({str(self.path)!r}, target={self.target}, submodels={self.submodels})"


def load_artifact(path, target: str | None = None, strict_shapes: bool | None = None) -> Artifact:
    """Open an artifact folder written by ``lower``; fails with one line when it is not usable here."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: not an artifact directory")
    manifest = read_manifest(path, required=True)
    if manifest.get("kind") != ARTIFACT_KIND:
        raise InputError(f"{path}: not an sdgraph artifact (manifest kind {manifest.get('kind')!r}; lower it with `sdgraph lower`)")
    if manifest.get("sdgraph_version") != _version():
        raise InputError(f"{path}: built by sdgraph {manifest.get('sdgraph_version')}, this is {_version()}; lower it again")
    if target is not None and manifest.get("target") != target:
        raise InputError(f"{path}: artifact is for target {manifest.get('target')!r}, not {target!r}")
    subs = manifest.get("submodels")
    if not isinstance(subs, dict) or not subs:
        raise InputError(f"{path}: corrupted artifact (manifest lists no submodels)")
    for name, entry in subs.items():
        for rel, size in dict(entry.get("files", {})).items():
            f = path / name / rel
            if not f.is_file():
                raise InputError(f"{path}: corrupted artifact ({name}/{rel} is missing)")
            if f.stat().st_size != size:
                raise InputError(f"{path}: corrupted artifact ({name}/{rel} is {f.stat().st_size} bytes, manifest says {size})")
    tgt = get_target(manifest["target"])
    tgt.require()
    return Artifact(path, manifest, tgt, strict_shapes)
