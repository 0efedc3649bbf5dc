"""Shared helpers for the precision passes: SD ignored scopes, activation probes, runtimes."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from sdgraph.errors import InputError

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
_TIME_INPUTS = ("timestep", "time_ids", "text_embeds", "timestep_cond")
_QUANT_OPS = ("Conv", "MatMul", "Gemm")

# Name fragments used when the structural search finds nothing (diffusers' module names).
_NAME_FALLBACK = {
    "unet": ("conv_in", "conv_out", "time_embedding", "time_emb_proj", "down_blocks.1.resnets.0.conv_shortcut"),
    "vae_decoder": ("post_quant_conv", "decoder.conv_in", "decoder.conv_out"),
    "vae_encoder": ("encoder.conv_in", "encoder.conv_out", "quant_conv"),
}


def reachable_from(graph: gs.Graph, names: Iterable[str]) -> set[int]:
    """ids of the nodes that depend (transitively) on any of the tensors ``names``."""
    names = set(names)
    seen: set[int] = set()
    for node in graph.toposort().nodes:
        if any((t.name in names) or (t.inputs and id(t.inputs[0]) in seen) for t in node.inputs if isinstance(t, gs.Variable)):
            seen.add(id(node))
    return seen


def time_embedding_nodes(graph: gs.Graph) -> list[gs.Node]:
    """UNet nodes that read the timestep (or SDXL's added conditions) but not the latents.

    That is the sinusoidal embedding, the time MLP and every resnet's ``time_emb_proj``.
    """
    ins = {t.name for t in graph.inputs}
    time_ins = [n for n in ins if any(k in n.lower() for k in _TIME_INPUTS)]
    latent_ins = [n for n in ins if n not in time_ins and "encoder_hidden" not in n.lower()]
    if not time_ins:
        return []
    from_time = reachable_from(graph, time_ins)
    from_latent = reachable_from(graph, latent_ins)
    return [n for n in graph.nodes if id(n) in from_time and id(n) not in from_latent]


def _kernel(node: gs.Node) -> tuple | None:
    ks = node.attrs.get("kernel_shape")
    if ks is not None:
        return tuple(ks)
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if isinstance(w, gs.Constant) and w.shape is not None and len(w.shape) == 4:
        return tuple(w.shape[2:])
    return None


def _first_shortcut_conv(convs: list[gs.Node]) -> gs.Node | None:
    """The first 1x1 Conv added to a 3x3 Conv's output: a resnet's ``conv_shortcut``.

    Attention's 1x1 ``proj_out`` is added to the block input, not to a 3x3 Conv, so it is not taken.
    """
    for conv in convs:
        if _kernel(conv) != (1, 1):
            continue
        for add in conv.outputs[0].outputs:
            if add.op != "Add":
                continue
            other = [t for t in add.inputs if t is not conv.outputs[0]]
            if other and other[0].inputs and other[0].inputs[0].op == "Conv" and _kernel(other[0].inputs[0]) == (3, 3):
                return conv
    return None


def default_scope(model) -> tuple[list[str], list[str]]:
    """(node names, notes) the seeds leave in float: conv_in, conv_out, time embedding, first shortcut.

    Found from the graph's structure; diffusers' module names are the fallback for what the
    structure does not show.
    """
    graph = model.graph.toposort()
    role = model.role
    convs = [n for n in graph.nodes if n.op == "Conv"]
    picked: dict[str, str] = {}
    if role == "unet":
        if convs:
            picked[convs[0].name] = "conv_in"
            picked[convs[-1].name] = "conv_out"
        for n in time_embedding_nodes(graph):
            if n.op in _QUANT_OPS:
                picked[n.name] = "time_embedding"
        sc = _first_shortcut_conv(convs)
        if sc is not None:
            picked[sc.name] = "first_shortcut_conv"
    elif role in ("vae_decoder", "vae_encoder"):
        # The convolutions straight after the input (post_quant_conv, conv_in) and the last one.
        ins = {t.name for t in graph.inputs}
        for conv in convs:
            src = conv.inputs[0]
            while src.inputs and src.inputs[0].op == "Conv":
                src = src.inputs[0].inputs[0]
            if src.name in ins:
                picked[conv.name] = "conv_in"
        if convs:
            picked[convs[-1].name] = "conv_out"
    notes = []
    fragments = _NAME_FALLBACK.get(role, ())
    found_kinds = set(picked.values())
    wanted = {"unet": {"conv_in", "conv_out", "time_embedding", "first_shortcut_conv"},
              "vae_decoder": {"conv_in", "conv_out"}, "vae_encoder": {"conv_in", "conv_out"}}.get(role, set())
    if wanted - found_kinds:
        extra = match_names(graph, fragments, ops=_QUANT_OPS)
        for name in extra:
            picked.setdefault(name, "by_name")
        notes.append(f"structural scope missed {sorted(wanted - found_kinds)}; matched {len(extra)} node(s) by name")
    return list(picked), notes


def match_names(graph: gs.Graph, patterns: Iterable[str], ops: Iterable[str] | None = None) -> list[str]:
    """Node names equal to or containing any pattern (optionally only nodes of ``ops``)."""
    patterns = [p for p in patterns if p]
    ops = set(ops) if ops else None
    out = []
    for n in graph.nodes:
        if ops and n.op not in ops:
            continue
        if any(p == n.name or p in n.name for p in patterns):
            out.append(n.name)
    return out


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
