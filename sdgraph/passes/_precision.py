"""Shared helpers for the precision passes: activation probes, runtimes; the SD ignored scope comes from sdgraph.quant.scope."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from sdgraph.errors import InputError
from sdgraph.ir.build import GraphBuilder
from sdgraph.quant.scope import default_scope, match_names, reachable_from, time_embedding_nodes

__all__ = [
    "FLOAT_TYPES",
    "reachable_from",
    "time_embedding_nodes",
    "default_scope",
    "match_names",
    "probe_activations",
    "run_any",
]

log = logging.getLogger(__name__)

FLOAT_TYPES = (np.dtype(np.float32), np.dtype(np.float16))


# -- activation probes -------------------------------------------------------------------------
def probe_activations(model, tensors: list[str], feeds_list: list[Mapping[str, np.ndarray]],
                      runtime: str = "auto") -> tuple[dict[str, tuple[float, bool]], str]:
    """Per tensor: (max |x| over the feeds, all finite). Returns (stats, runtime used).

    Each probed tensor gets Cast(float32) -> Abs -> ReduceMax and a ReduceMax over IsNaN|IsInf added
    to a copy of the graph, so only scalars leave the runtime (a 512 px UNet's activations never
    pile up in memory).
    """
    probe = model.copy()
    g = probe.graph
    tmap = g.tensors()
    outs: list[tuple[str, gs.Variable, gs.Variable]] = []
    b = GraphBuilder(g)
    f32, to_f32 = np.float32, {"to": onnx.TensorProto.FLOAT}
    for k, name in enumerate(tensors):
        t = tmap.get(name)
        if t is None or isinstance(t, gs.Constant):
            continue
        p = f"__probe{k}"
        f = b.op("Cast", [t], name=f"{p}_cast", attrs=to_f32, out=b.var(f"{p}_f", f32))
        a = b.op("Abs", [f], name=f"{p}_abs", out=b.var(f"{p}_a", f32))
        mx = b.op("ReduceMax", [a], name=f"{p}_rmax", attrs={"keepdims": 0}, out=b.var(f"{p}_max", f32, []))
        isnan = b.op("IsNaN", [f], name=f"{p}_nan", out=b.var(f"{p}_isnan", np.bool_))
        isinf = b.op("IsInf", [f], name=f"{p}_inf", out=b.var(f"{p}_isinf", np.bool_))
        bad = b.op("Or", [isnan, isinf], name=f"{p}_or", out=b.var(f"{p}_bad", np.bool_))
        badf = b.op("Cast", [bad], name=f"{p}_castb", attrs=to_f32, out=b.var(f"{p}_badf", f32))
        sm = b.op("ReduceMax", [badf], name=f"{p}_rbad", attrs={"keepdims": 0}, out=b.var(f"{p}_nonfinite", f32, []))
        outs.append((name, mx, sm))
    g.outputs = list(g.outputs) + [v for _, mx, sm in outs for v in (mx, sm)]
    stats: dict[str, tuple[float, bool]] = {name: (0.0, True) for name, _, _ in outs}
    used = None
    for feeds in feeds_list:
        res, used = run_any(probe, feeds, runtime)
        for name, mx, sm in outs:
            m, bad = float(res[mx.name]), float(res[sm.name])
            prev = stats[name]
            stats[name] = (max(prev[0], m if np.isfinite(m) else float("inf")), prev[1] and bad == 0.0)
    return stats, used or runtime


def run_any(model, feeds: Mapping[str, np.ndarray], runtime: str = "auto") -> tuple[dict[str, np.ndarray], str]:
    """Run in ONNX Runtime, or OpenVINO when ORT has no kernel for the graph (bf16 on CPU)."""
    from sdgraph.ir import runtime as rt

    err = None
    if runtime in ("auto", "ort"):
        try:
            sess = rt.session(model)
        except InputError as exc:
            err = exc
            if runtime == "ort":
                raise
        else:
            names = [o.name for o in sess.get_outputs()]
            return dict(zip(names, sess.run(names, dict(feeds)))), "onnxruntime"
    try:
        return _run_openvino(model, feeds), "openvino"
    except ImportError:
        raise InputError(f"no runtime here can run this graph ({err})") from None


def _run_openvino(model, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    import openvino as ov

    import onnx.inliner

    from sdgraph.ir.model import Model

    if model.functions:  # OpenVINO's ONNX frontend has no rule for model-local functions (fa, gn, geglu)
        model = Model.from_proto(onnx.inliner.inline_local_functions(model.to_proto()), base_dir=model.base_dir)
    with tempfile.TemporaryDirectory(prefix="sdgraph-ov-") as tmp:
        path = model.save_to_dir_unchecked(Path(tmp))
        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(path)), "CPU")
        res = compiled(dict(feeds))
        out = {}
        for o, v in res.items():
            for name in o.get_names():
                out[name] = np.asarray(v)
        return out
