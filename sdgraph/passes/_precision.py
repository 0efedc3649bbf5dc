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
    for k, name in enumerate(tensors):
        t = tmap.get(name)
        if t is None or isinstance(t, gs.Constant):
            continue
        f = gs.Variable(f"__probe{k}_f", dtype=np.float32)
        a = gs.Variable(f"__probe{k}_a", dtype=np.float32)
        mx = gs.Variable(f"__probe{k}_max", dtype=np.float32, shape=[])
        isnan = gs.Variable(f"__probe{k}_isnan", dtype=np.bool_)
        isinf = gs.Variable(f"__probe{k}_isinf", dtype=np.bool_)
        bad = gs.Variable(f"__probe{k}_bad", dtype=np.bool_)
        badf = gs.Variable(f"__probe{k}_badf", dtype=np.float32)
        sm = gs.Variable(f"__probe{k}_nonfinite", dtype=np.float32, shape=[])
        g.nodes += [
            gs.Node("Cast", f"__probe{k}_cast", attrs={"to": onnx.TensorProto.FLOAT}, inputs=[t], outputs=[f]),
            gs.Node("Abs", f"__probe{k}_abs", inputs=[f], outputs=[a]),
            gs.Node("ReduceMax", f"__probe{k}_rmax", attrs={"keepdims": 0}, inputs=[a], outputs=[mx]),
            gs.Node("IsNaN", f"__probe{k}_nan", inputs=[f], outputs=[isnan]),
            gs.Node("IsInf", f"__probe{k}_inf", inputs=[f], outputs=[isinf]),
            gs.Node("Or", f"__probe{k}_or", inputs=[isnan, isinf], outputs=[bad]),
            gs.Node("Cast", f"__probe{k}_castb", attrs={"to": onnx.TensorProto.FLOAT}, inputs=[bad], outputs=[badf]),
            gs.Node("ReduceMax", f"__probe{k}_rbad", attrs={"keepdims": 0}, inputs=[badf], outputs=[sm]),
        ]
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
