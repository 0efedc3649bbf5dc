"""How much quantization costs, measured on held-back inputs: fidelity, per-layer sensitivity, auto-exclude."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np

from sdgraph.ir import runtime as rt

__all__ = ["Fidelity", "sensitivity", "auto_exclude"]

log = logging.getLogger(__name__)

Numbers = dict[str, float]  # {"cosine": worst cosine, "max_rel": worst max relative error}


class Fidelity:
    """Worst cosine and max relative error of a quantized model file against the float model on ``held`` feeds."""

    def __init__(self, model, held: list[dict[str, np.ndarray]]):
        self.held = list(held)
        self.refs = []
        if self.held:
            sess = rt.session(model)
            self.refs = [sess.run(None, f) for f in self.held]
            del sess  # a 3.4 GB UNet session should not live through calibration

    def __call__(self, path: Path) -> Numbers:
        if not self.held:
            return {"cosine": float("nan"), "max_rel": float("nan")}
        sess = rt.session(path, optimize=True)  # QDQ fused into the integer kernels users run
        worst = {"cosine": 1.0, "max_rel": 0.0}
        for f, ref in zip(self.held, self.refs):
            out = sess.run(None, f)
            w = rt.worst(rt.compare({str(i): r for i, r in enumerate(ref)}, {str(i): o for i, o in enumerate(out)}))
            worst = {"cosine": min(worst["cosine"], w["cosine"]), "max_rel": max(worst["max_rel"], w["max_rel"])}
        return worst


def sensitivity(layers: list[str], k: int, quantize_only: Callable[[str, Path], None], fidelity: Fidelity,
                work: Path) -> list[tuple[str, Numbers]]:
    """``k`` layers spread over ``layers``, each quantized alone and measured; worst (lowest cosine) first."""
    if not layers:
        return []
    idx = np.linspace(0, len(layers) - 1, min(k, len(layers))).round().astype(int)
    out = []
    for i, name in enumerate(dict.fromkeys(layers[j] for j in idx)):
        one = work / f"one{i}.onnx"
        quantize_only(name, one)
        out.append((name, fidelity(one)))
        for f in work.glob(f"one{i}.onnx*"):
            f.unlink()
    out.sort(key=lambda x: (x[1]["cosine"], -x[1]["max_rel"]))
    return out


def auto_exclude(ranked: list[str], min_cosine: float, quantize_without: Callable[[list[str], Path], None],
                 fidelity: Fidelity, work: Path, start: Numbers, start_path: Path) -> tuple[list[str], Numbers, Path]:
    """Keep the 1, 2, 4 ... most sensitive layers in float until the held-back cosine reaches ``min_cosine``.

    Returns (layers kept in float, their numbers, the model file they were measured on).
    """
    numbers, path, chosen = start, start_path, []
    k = 1
    while numbers["cosine"] < min_cosine and k <= len(ranked):
        chosen = ranked[:k]
        path = work / f"auto{k}.onnx"
        quantize_without(chosen, path)
        numbers = fidelity(path)
        log.info("qdq auto_exclude %d layer(s): cosine %.6f", k, numbers["cosine"])
        k *= 2
    return chosen, numbers, path
