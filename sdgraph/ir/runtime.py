"""Run models in ONNX Runtime on seeded inputs and compare outputs in numbers."""

from __future__ import annotations

import logging
import re
from typing import Mapping, Sequence

import numpy as np

from sdgraph.errors import InputError

__all__ = ["session", "run", "seeded_inputs", "compare", "worst", "worst_of", "input_specs", "pick_output",
           "penultimate_hidden_state"]

log = logging.getLogger(__name__)

# Defaults for symbolic dimensions, by name fragment (users override with shapes=...).
_DIM_DEFAULTS = (("batch", 1), ("sequence", 77), ("height", 64), ("width", 64), ("channels", 4))


def _as_model(model_or_path):
    from sdgraph.ir.model import Model

    if isinstance(model_or_path, Model):
        return model_or_path
    return Model.load(model_or_path)


def session(model_or_path, optimize: bool = False, threads: int | None = None, providers=None):
    """An ONNX Runtime CPU session; graph optimizations off unless ``optimize``.

    External weights are read from the model's own folder, so nothing is copied to disk.
    """
    import onnxruntime as ort

    model = _as_model(model_or_path)
    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.log_severity_level = 4  # failures come back as exceptions; ORT would also print them
    if threads:
        so.intra_op_num_threads = threads
    if model.base_dir is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model.base_dir))
    proto = model.to_proto()
    try:
        return ort.InferenceSession(proto.SerializeToString(), so, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:
        raise InputError(f"ONNX Runtime cannot load {model.name}: {str(exc).splitlines()[0]}") from None


def input_specs(model_or_path, shapes: Mapping[str, tuple] | None = None) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Concrete (shape, dtype) per graph input; symbolic dims from ``shapes`` or name defaults."""
    model = _as_model(model_or_path)
    shapes = dict(shapes or {})
    specs = {}
    for t in model.graph.inputs:
        if t.name in shapes:
            dims = tuple(int(d) for d in shapes[t.name])
        else:
            dims = []
            for d in t.shape or ():
                if isinstance(d, (int, np.integer)) and d >= 0:
                    dims.append(int(d))
                else:
                    key = str(d).lower()
                    dims.append(next((v for frag, v in _DIM_DEFAULTS if frag in key), 1))
            dims = tuple(dims)
        specs[t.name] = (dims, np.dtype(t.dtype) if t.dtype is not None else np.dtype(np.float32))
    return specs


def _vocab_limit(model) -> int:
    """Largest safe token id: the smallest embedding table fed by a graph input."""
    import onnx_graphsurgeon as gs

    limit = 49408
    int_inputs = {t.name for t in model.graph.inputs if t.dtype in (np.int64, np.int32)}
    for node in model.graph.nodes:
        if node.op == "Gather" and isinstance(node.inputs[0], gs.Constant):
            idx = node.inputs[1]
            seen = 0
            while not isinstance(idx, gs.Constant) and idx.name not in int_inputs and idx.inputs and seen < 4:
                idx = idx.inputs[0].inputs[0] if idx.inputs[0].inputs else idx
                seen += 1
            if idx.name in int_inputs:
                limit = min(limit, int(node.inputs[0].shape[0]))
    return limit


def seeded_inputs(model_or_path, seed: int = 0, shapes: Mapping[str, tuple] | None = None) -> dict[str, np.ndarray]:
    """Deterministic inputs that look like real use for each role's inputs."""
    model = _as_model(model_or_path)
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, (dims, dtype) in input_specs(model, shapes).items():
        lname = name.lower()
        if np.issubdtype(dtype, np.integer):
            if "time" in lname:
                arr = rng.integers(0, 1000, size=dims)
            else:
                arr = rng.integers(0, _vocab_limit(model), size=dims)
            feeds[name] = arr.astype(dtype)
        elif dtype == np.bool_:
            feeds[name] = np.ones(dims, dtype=bool)
        else:
            if "timestep" in lname:
                arr = rng.uniform(0, 999, size=dims).round()
            elif "time_ids" in lname:
                arr = np.tile(np.array([64, 64, 0, 0, 64, 64], dtype=np.float64), int(np.prod(dims)) // 6 or 1)[: int(np.prod(dims))].reshape(dims)
            else:
                arr = rng.standard_normal(size=dims)
            feeds[name] = arr.astype(dtype)
    return feeds


def run(model_or_path, feeds: Mapping[str, np.ndarray] | None = None, optimize: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    model = _as_model(model_or_path)
    feeds = dict(feeds) if feeds is not None else seeded_inputs(model, seed)
    sess = session(model, optimize=optimize)
    names = [o.name for o in sess.get_outputs()]
    outs = sess.run(names, feeds)
    return dict(zip(names, outs))


def compare(ref: Mapping[str, np.ndarray], cand: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per output: max_abs, max_rel (max |a-b| / max |a|), mean_abs, cosine, finite."""
    report = {}
    for name, a in ref.items():
        if name not in cand:
            raise InputError(f"output {name!r} is missing from the candidate")
        a64 = np.asarray(a, dtype=np.float64).ravel()
        b64 = np.asarray(cand[name], dtype=np.float64).ravel()
        if a64.shape != b64.shape:
            raise InputError(f"output {name!r}: shapes differ {np.shape(a)} vs {np.shape(cand[name])}")
        # NaN or Inf on either side makes every number NaN: no threshold can pass on it
        finite = bool(np.isfinite(a64).all() and np.isfinite(b64).all())
        if not finite:
            nan = float("nan")
            report[name] = {"max_abs": nan, "max_rel": nan, "mean_abs": nan, "cosine": nan, "finite": False}
            continue
        diff = np.abs(a64 - b64)
        max_abs = float(diff.max()) if diff.size else 0.0
        scale = float(np.abs(a64).max()) if a64.size else 0.0
        na, nb = float(np.linalg.norm(a64)), float(np.linalg.norm(b64))
        if na == 0.0 and nb == 0.0:
            cos = 1.0
        elif na == 0.0 or nb == 0.0:
            cos = 0.0
        else:
            cos = float(np.dot(a64, b64) / (na * nb))
        report[name] = {
            "max_abs": max_abs,
            "max_rel": max_abs / scale if scale > 0 else max_abs,
            "mean_abs": float(diff.mean()),
            "cosine": cos,
            "finite": finite,
        }
    return report


def worst(report: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The worst numbers over all outputs of a compare() report."""
    if not report:
        return {"max_abs": 0.0, "max_rel": 0.0, "cosine": 1.0}
    vals = list(report.values())
    return {"max_abs": worst_of((r["max_abs"] for r in vals), max), "max_rel": worst_of((r["max_rel"] for r in vals), max),
            "cosine": worst_of((r["cosine"] for r in vals), min)}


def worst_of(values, fn=min, default: float = float("nan")) -> float:
    """``fn`` (min or max) over ``values`` where NaN wins (Python's min/max drop it depending on order)."""
    vals = [float(v) for v in values]
    if not vals:
        return default
    return float("nan") if any(v != v for v in vals) else fn(vals)


def pick_output(outs: Mapping[str, np.ndarray], names: Sequence[str], fallback: int) -> np.ndarray:
    """The first of ``names`` among a run's outputs, else the output at position ``fallback``."""
    for n in names:
        if n in outs:
            return np.asarray(outs[n])
    return np.asarray(list(outs.values())[fallback])


def penultimate_hidden_state(outs: Mapping[str, np.ndarray]) -> np.ndarray:
    """SDXL conditions on the penultimate hidden state of each text encoder."""
    for k, v in outs.items():
        if "penultimate" in k:
            return np.asarray(v)
    numbered = sorted((int(m.group(1)), k) for k in outs if (m := re.search(r"hidden_states\.(\d+)$", k)))
    if len(numbered) >= 2:
        return np.asarray(outs[numbered[-2][1]])
    log.warning("no penultimate hidden state among %s; using the last hidden state", list(outs))
    return pick_output(outs, ("last_hidden_state",), 0)
