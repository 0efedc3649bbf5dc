"""``sdgraph refit``: new weights for a lowered artifact (LoRAs added or removed) without re-running passes or lowering.

The generic part, shared by every target:

1. the artifact is checked (``load_artifact``) and copied to the output folder (atomic, as every writer);
2. per UNet / text encoder, the LoRAs are matched against the submodel's ONNX graph (the artifact's
   own ``model.onnx`` when the target keeps one, else the model directory it was lowered from) with
   ``sdgraph.ir.lora``, exactly as the ``lora`` pass does;
3. the base value of every touched initializer is kept in ``<submodel>/lora-base.npz`` the first time
   it changes; the new value is always base + the deltas of every LoRA now applied, so ``--remove``
   writes the base back bit for bit and refits do not drift (an INT8 weight is requantized from its base
   int8 values and scale: its activation scales keep the calibration);
4. the target's ``refit(sub_dir, entry, changes, ctx)`` writes the changed tensors into its files
   (``changes``: initializer name -> (value in the artifact now, new value));
5. the manifest records the LoRAs applied (file, sha256, scale) and the files' new sizes.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sdgraph.errors import InputError, UsageError
from sdgraph.ir.lora import COMPONENTS, LoraFile, WeightRef, check_matching, folded, load_lora, match_weights
from sdgraph.ir.model import Model
from sdgraph.limits import check
from sdgraph.manifest import file_hash, write_manifest
from sdgraph.targets.base import LowerContext

__all__ = ["refit", "RefitResult", "parse_lora_arg", "BACKUP"]

BACKUP = "lora-base.npz"


@dataclasses.dataclass
class RefitResult:
    out: Path
    target: str
    applied: list[dict[str, Any]]
    submodels: dict[str, dict[str, Any]]  # per submodel: tensors changed, how matched, unmatched, seconds
    seconds: float


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` -> (path, scale); a tail that is no number stays part of the path."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            scale = float(tail)
        except ValueError:
            return text, 1.0
        check("lora scale", scale)
        return path, scale
    return text, 1.0


def _graph_for(artifact: Path, name: str, entry: dict, manifest: dict) -> Model:
    """The ONNX graph the submodel was built from: the artifact's own, else the source model directory's.
    Only its initializers and names are read: the external data is validated (``load_proto``), the graph
    structure check of ``Model.load`` (a cycle search, most of a refit's time) is skipped."""
    from sdgraph.ir.io import load_proto

    own = entry.get("model") or dict(dict(entry.get("models", {})).get("model", {})).get("onnx")  # ort/torch; ascend
    if own and (artifact / name / own).is_file():
        proto, base = load_proto(artifact / name / own)
        model = Model.from_proto(proto, base_dir=base)
        model.path = artifact / name / own
        return model
    src = Path(str(manifest.get("source", {}).get("path", "")))
    f = src / name / "model.onnx" if (src / name / "model.onnx").is_file() else src
    if not f.is_file():
        raise InputError(f"{artifact}: the {manifest.get('target')} artifact keeps no ONNX graph of {name} and the model "
                         f"directory it was lowered from ({src}) is gone: refit needs it to find the weights")
    proto, base = load_proto(f)
    model = Model.from_proto(proto, base_dir=base)
    model.path = f
    return model


def refit(artifact, loras: list[tuple[str, float]], out, *, remove: bool = False, strict: bool = False,
          force: bool = False, progress: Callable[[str], None] | None = None) -> RefitResult:
    """Write ``out``: ``artifact`` with ``loras`` folded in (``remove``: the LoRAs applied before taken out first)."""
    from sdgraph.ir import io, outputs
    from sdgraph.targets.driver import load_artifact

    t0 = time.perf_counter()
    artifact, out = Path(artifact), Path(out)
    if not loras and not remove:
        raise UsageError("refit: nothing to do (give --lora PATH[:SCALE], or --remove to restore the base weights)")
    art = load_artifact(artifact)
    tgt = art.target_impl
    manifest = dict(art.manifest)
    outputs.guard_output(out, [artifact], force=force)
    files = [(load_lora(p), float(s)) for p, s in loras]  # every file checked before any work
    state = dict(manifest.get("lora") or {})
    before = [] if remove else list(state.get("applied", []))
    prev = [(load_lora(a["file"]), float(a["scale"])) for a in state.get("applied", [])]
    applied = before + [{"file": str(Path(p).resolve()), "sha256": file_hash(p), "scale": float(s)} for p, s in loras]
    now = ([] if remove else prev) + files
    say = progress or (lambda m: None)
    results: dict[str, dict[str, Any]] = {}
    # weight files the target's refit never writes are hard-linked, not copied (a full-size UNet: 7 GB)
    shared = frozenset(p for name, e in manifest["submodels"].items() if (artifact / name).is_dir()
                       for p in tgt.refit_shared(artifact / name, e))
    with io.atomic_dir(out, force=force) as tmp:
        for item in sorted(artifact.iterdir()):
            if item.name != "sdgraph.json":
                io.copy_inside(item, tmp / item.name, artifact, share=shared)
        any_matched = False
        for name, entry in manifest["submodels"].items():
            if name not in COMPONENTS:
                continue
            t1 = time.perf_counter()
            mine = [(lf, s) for lf, s in files if lf.for_component(name)]
            if not mine and not any(lf.for_component(name) for lf, _ in prev):
                continue
            model = _graph_for(artifact, name, entry, manifest)
            backup_file = tmp / name / BACKUP
            backup = dict(np.load(backup_file)) if backup_file.is_file() else {}
            current = _deltas(model, prev, name, backup, strict=False)  # what the artifact holds now
            new = _deltas(model, now, name, backup, strict=strict, report=results.setdefault(name, {}))
            any_matched = any_matched or bool(results[name].get("matched"))
            changes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
            for tname in set(current) | set(new) | set(backup):
                base = backup.get(tname)
                if base is None:
                    base = current.get(tname, new.get(tname))[1]
                    backup[tname] = base
                cur = current[tname][0] if tname in current else base
                nxt = new[tname][0] if tname in new else base
                if not np.array_equal(cur, nxt):
                    changes[tname] = (cur, nxt)
            say(f"{name}: {len(changes)} tensor(s) to rewrite")
            ctx = LowerContext(precision=entry.get("precision", manifest.get("precision", "fp32")),
                               shapes=[{k: tuple(v) for k, v in b.items()} for b in entry.get("shapes", [])],
                               options=dict(manifest.get("options", {})), role=name, submodel=name)
            if changes:
                entry = dict(entry)
                entry.update(tgt.refit(tmp / name, entry, changes, ctx) or {})
            if backup and any(lf.for_component(name) for lf, _ in now):
                np.savez(backup_file, **backup)
            else:  # nothing applied any more: the artifact holds the base again
                backup_file.unlink(missing_ok=True)
            entry["files"] = {str(p.relative_to(tmp / name)): p.stat().st_size for p in sorted((tmp / name).rglob("*")) if p.is_file()}
            manifest["submodels"] = {**manifest["submodels"], name: entry}
            results[name].update({"tensors": len(changes), "seconds": round(time.perf_counter() - t1, 3)})
        if files and not any_matched:
            raise InputError(f"{files[0][0].path}: no LoRA module matches a weight of {artifact} "
                             f"(submodels: {', '.join(manifest['submodels'])}): a LoRA for another architecture?")
        manifest.pop("lora", None)
        if applied:
            manifest["lora"] = {"applied": applied, "backup": BACKUP}
        write_manifest(tmp, manifest)
    return RefitResult(out, manifest["target"], applied, results, time.perf_counter() - t0)


def _deltas(model: Model, loras: list[tuple[LoraFile, float]], component: str, backup: dict[str, np.ndarray], *,
            strict: bool, report: dict | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """initializer name -> (value with every LoRA of ``component`` folded in, base value). The base comes from
    the backup where a refit kept it, else from the graph; the LoRAs are added one after the other in float32,
    as the ``lora`` pass does, then each weight is written back in its dtype (INT8: requantized once)."""
    acc: dict[str, tuple[WeightRef, np.ndarray, dict[str, np.ndarray]]] = {}
    for lf, scale in loras:
        modules = lf.for_component(component)
        if not modules:
            continue
        matching = match_weights(model.graph, model.metadata, modules)
        check_matching(f"{component}", lf, component, matching, strict)
        if report is not None:
            report["matched"] = report.get("matched", 0) + len(matching.matched)
            report["unmatched"] = report.get("unmatched", 0) + len(matching.unmatched)
            for how, n in matching.counts().items():
                report[f"by_{how}"] = report.get(f"by_{how}", 0) + n
        by = {m.module: m for m in modules}
        for module, ref in matching.matched.items():
            name = ref.tensor.name
            if name not in acc:
                base = {t.name: backup[t.name] if t.name in backup else np.asarray(t.values) for t in ref.tensors()}
                acc[name] = (ref, ref.as_float(base), base)
            r, value, base = acc[name]
            delta = by[module].delta(scale, lf.rslora.get(component, False))
            acc[name] = (r, folded(value, delta, ref.transposed), base)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for ref, value, base in acc.values():
        for tname, v in ref.materialize(value, base).items():
            out[tname] = (v, base[tname])
    return out
