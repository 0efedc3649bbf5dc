"""Calibration inputs from a file: for a graph with no pipeline folder around it (a bare ``unet.onnx``).

Two layouts, both validated against the graph inputs (names, rank, fixed dims, dtype):

- one ``.npz`` whose arrays are named as the graph inputs, the leading axis indexing samples
  (``sample`` of shape ``(N, 2, 4, 64, 64)`` for N samples of a ``(2, 4, 64, 64)`` input);
- a folder of ``.npz`` files, one sample each, arrays shaped exactly as the graph inputs.

``save_calib_data`` writes the first layout (``sdgraph calib-data`` uses it).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from sdgraph.errors import InputError
from sdgraph.ir.io import atomic_file

__all__ = ["load_calib_data", "save_calib_data"]


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: not a readable .npz archive ({str(exc).splitlines()[0] or type(exc).__name__})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise InputError(f"{path}: not an .npz archive (calib_data wants arrays named as the graph inputs)")
    try:
        with z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: not a readable .npz archive ({str(exc).splitlines()[0] or type(exc).__name__})") from None


def _fmt(shape: Sequence) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _check(where: str, sample: Mapping[str, np.ndarray], model, per_sample: str) -> None:
    inputs = {t.name: t for t in model.graph.inputs}
    missing = [n for n in inputs if n not in sample]
    extra = [n for n in sample if n not in inputs]
    if missing or extra:
        parts = ([f"missing {', '.join(map(repr, missing))}"] if missing else []) + (
            [f"unexpected {', '.join(map(repr, extra))}"] if extra else [])
        raise InputError(f"{where}: calibration data does not match the graph inputs: {'; '.join(parts)} "
                         f"(graph inputs: {', '.join(inputs)})")
    for name, t in inputs.items():
        arr = sample[name]
        if t.dtype is not None and arr.dtype != np.dtype(t.dtype):
            raise InputError(f"{where}: {name!r} has dtype {arr.dtype}, the graph input is {np.dtype(t.dtype)}")
        if t.shape is None:
            continue
        fixed = [d if isinstance(d, (int, np.integer)) and d >= 0 else None for d in t.shape]
        if arr.ndim != len(fixed) or any(f is not None and f != a for f, a in zip(fixed, arr.shape)):
            want = _fmt(d if d is not None else "?" for d in fixed)
            raise InputError(f"{where}: {name!r} has shape {_fmt(arr.shape)}{per_sample}, the graph input is {want}")


def load_calib_data(path: str | os.PathLike, model) -> list[dict[str, np.ndarray]]:
    """One feed dict per sample from ``path`` (an .npz or a folder of them), checked against ``model``'s inputs."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.npz"))
        if not files:
            raise InputError(f"{p}: no .npz files in the calib_data folder (one sample per file)")
        feeds = [_read_npz(f) for f in files]
        for f, feed in zip(files, feeds):
            _check(str(f), feed, model, "")
        return feeds
    if not p.is_file():
        raise InputError(f"{p}: calib_data file not found")
    arrays = _read_npz(p)
    if not arrays:
        raise InputError(f"{p}: the .npz holds no arrays")
    bad = [k for k, v in arrays.items() if v.ndim == 0]
    if bad:
        raise InputError(f"{p}: {bad[0]!r} is a scalar; the leading axis of every array indexes samples")
    counts = {k: v.shape[0] for k, v in arrays.items()}
    if len(set(counts.values())) != 1:
        raise InputError(f"{p}: arrays disagree on the number of samples (leading axis): "
                         + ", ".join(f"{k}={n}" for k, n in counts.items()))
    n = next(iter(counts.values()))
    if n == 0:
        raise InputError(f"{p}: the .npz holds 0 samples")
    feeds = [{k: np.ascontiguousarray(v[i]) for k, v in arrays.items()} for i in range(n)]
    _check(str(p), feeds[0], model, " per sample (after the leading sample axis)")
    return feeds


def save_calib_data(path: str | os.PathLike, feeds: Sequence[Mapping[str, np.ndarray]], force: bool = False) -> Path:
    """Write ``feeds`` as one .npz (arrays stacked on a new leading sample axis), atomically; an existing
    file is replaced only with ``force``."""
    p = Path(path)
    if not feeds:
        raise InputError("no calibration samples to write")
    names = list(feeds[0])
    for i, f in enumerate(feeds):
        if list(f) != names or any(f[k].shape != feeds[0][k].shape for k in names):
            raise InputError(f"calibration sample {i} differs in inputs or shapes from sample 0: cannot stack")
    arrays = {k: np.stack([np.asarray(f[k]) for f in feeds]) for k in names}
    with atomic_file(p, force=force) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    return p
