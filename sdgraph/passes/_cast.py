"""Shared body of the bf16 / fp16 passes: per-role block lists, overflow check, cast, NaN scan."""

from __future__ import annotations

import json
import logging
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from sdgraph.errors import UsageError, VerificationError
from sdgraph.ir.build import GraphBuilder
from sdgraph.passes._precision import match_names, probe_activations, time_embedding_nodes
from sdgraph.passes.base import Option, Pass, PassResult

__all__ = ["CastPass", "DEFAULT_BLOCK_OPS", "cast_graph", "PRECISION_MODE_KEY", "recorded_precision_mode", "apply_cast_mode"]

log = logging.getLogger(__name__)

# Kept in float32: exponentials, reductions and normalizations lose range or precision in 16 bits.
DEFAULT_BLOCK_OPS = (
    "Softmax", "LogSoftmax", "LayerNormalization", "GroupNormalization", "InstanceNormalization",
    "BatchNormalization", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "Pow", "Exp", "Log", "Sqrt",
    "Reciprocal", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "RandomNormal", "RandomNormalLike",
    "RandomUniform", "RandomUniformLike", "Range", "CumSum",
)
# Inputs that stay float32 whatever the node's precision (index per op).
_FP32_INPUTS = {"Resize": (1, 2), "Upsample": (1,)}
# Nodes that only look at a tensor's shape may read the low-precision copy directly.
_SHAPE_ONLY = ("Shape", "Size")
_F32 = np.dtype(np.float32)
# graph metadata written by ``mode=target``: {"precision": "bf16"|"fp16", "keep": [node names kept in float32],
# "named": [those of them the user named in keep=, which a target must keep whatever its own kernels do]}
PRECISION_MODE_KEY = "sdgraph.precision_mode"


def _low_dtype(kind: str):
    if kind == "fp16":
        return np.dtype(np.float16), onnx.TensorProto.FLOAT16
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16), onnx.TensorProto.BFLOAT16


def _max_value(kind: str) -> float:
    """Largest finite value of the target type (float16: 65504; bfloat16: about 3.39e38)."""
    if kind == "fp16":
        return float(np.finfo(np.float16).max)
    import ml_dtypes

    return float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)


def _is_f32(t) -> bool:
    return t is not None and t.dtype is not None and np.dtype(t.dtype) == _F32


def plan(model, block_ops, keep_names: set[str]) -> tuple[list[gs.Node], dict[str, str]]:
    """(nodes that go to low precision, {kept node: reason}) for the cast."""
    from sdgraph.ir.shapes import infer_shapes

    infer_shapes(model)
    graph = model.graph.toposort()
    kept: dict[str, str] = {}
    time_nodes = {id(n) for n in time_embedding_nodes(graph)} if model.role in ("unet", "controlnet") else set()
    low = []
    for n in graph.nodes:
        if (n.domain or "") not in ("", "ai.onnx") or n.op in block_ops:
            if any(_is_f32(t) for t in n.outputs):
                kept[n.name] = f"op {n.domain + '::' if n.domain else ''}{n.op}"
            continue
        if n.name in keep_names:
            kept[n.name] = "kept by name"
            continue
        if id(n) in time_nodes:
            kept[n.name] = "time embedding"
            continue
        if any(isinstance(a, gs.Graph) for a in n.attrs.values()):
            kept[n.name] = "has a subgraph"
            continue
        f_in = [t for t in n.inputs if _is_f32(t)]
        f_out = [t for t in n.outputs if _is_f32(t)]
        if not f_in or not f_out:
            continue  # sources (Constant, ConstantOfShape), casts, comparisons, shape ops
        if any(t.dtype is None for t in list(n.inputs) + list(n.outputs) if not t.is_empty()):
            kept[n.name] = "unknown dtype"
            continue
        if n.op == "Cast":
            continue
        low.append(n)
    return low, kept


def cast_graph(model, low_nodes: list[gs.Node], kind: str) -> dict[str, int]:
    """Rewrite ``low_nodes`` to run in ``kind`` (fp16|bf16); Casts at every float32 boundary.

    Graph inputs and outputs keep their types: a low node's output gets a low-precision twin
    read by other low nodes, and a Cast back to float32 keeps the original tensor for the rest.
    """
    np_low, onnx_low = _low_dtype(kind)
    graph = model.graph
    fmax = _max_value(kind)
    low_ids = {id(n) for n in low_nodes}
    alias: dict[str, gs.Variable] = {}  # float32 tensor -> its low-precision twin
    const_cache: dict[int, gs.Constant] = {}
    weights = 0
    b = GraphBuilder(graph)
    made: dict[str, list[gs.Node]] = {"in": [], "out": []}

    def cast_node(src, dst, to, name, side):
        made[side].append(b.node("Cast", [src], [dst], name=name, attrs={"to": to}))

    for node in list(graph.toposort().nodes):
        if id(node) not in low_ids:
            if node.op in _SHAPE_ONLY and node.inputs and node.inputs[0].name in alias:
                node.inputs[0] = alias[node.inputs[0].name]
            continue
        keep_idx = _FP32_INPUTS.get(node.op, ())
        for i, t in enumerate(list(node.inputs)):
            if i in keep_idx or not _is_f32(t):
                continue
            if isinstance(t, gs.Constant):
                c = const_cache.get(id(t))
                if c is None:
                    # np.asarray again: a ufunc on a 0-d array (a folded scalar) returns a numpy scalar
                    vals = np.asarray(np.clip(np.asarray(t.values, dtype=np.float32), -fmax, fmax).astype(np_low))
                    c = const_cache[id(t)] = gs.Constant(f"{t.name}_{kind}", vals)
                    weights += 1
                node.inputs[i] = c
            elif t.name in alias:
                node.inputs[i] = alias[t.name]
            else:
                v = gs.Variable(f"{t.name}_{kind}", dtype=np_low, shape=t.shape)
                cast_node(t, v, onnx_low, f"{t.name}_to_{kind}", "in")
                alias[t.name] = v
                node.inputs[i] = v
        for j, o in enumerate(list(node.outputs)):
            if not _is_f32(o):
                continue
            v = gs.Variable(f"{o.name}_{kind}", dtype=np_low, shape=o.shape)
            node.outputs[j] = v
            o.inputs.clear()
            cast_node(v, o, onnx.TensorProto.FLOAT, f"{o.name}_from_{kind}", "out")
            alias[o.name] = v
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    live = {id(n) for n in graph.nodes}
    return {
        "casts_in": sum(id(n) in live for n in made["in"]),
        "casts_out": sum(id(n) in live for n in made["out"]),
        "weights_cast": weights,
    }


class CastPass(Pass):
    """Base for bf16/fp16: subclasses set ``kind`` and ``role_defaults``."""

    exact = False
    kind: ClassVar[str] = "fp16"
    # Roles kept entirely in float32 unless ``force=true`` (e.g. the VAE decoder for fp16).
    keep_roles: ClassVar[tuple[str, ...]] = ()
    options = (
        Option("keep", list, [], "node names/fragments kept in float32"),
        Option("block_ops", list, list(DEFAULT_BLOCK_OPS), "op types kept in float32"),
        Option("force", bool, False, "cast roles that are kept whole in float32 by default"),
        Option("overflow_check", bool, True, "run sample inputs first; keep nodes that would overflow in float32"),
        Option("nan_scan", bool, True, "after casting, run sample inputs and fail on NaN/Inf naming the node"),
        Option("samples", int, 1, "sample inputs for the overflow check and the NaN scan", min=1),
        Option("min_cosine", float, None, "fail under --verify below this cosine", min=-1, max=1),
        Option("mode", str, "cast", "cast: Cast nodes in the graph; target: leave it float32 and record the precision "
               "and keep list for a target with its own reduced-precision mode (others get the casts at lowering)",
               choices=("cast", "target")),
    )

    def _samples(self, model):
        from sdgraph.ir import runtime as rt

        return [rt.seeded_inputs(model, seed=s) for s in range(self.opts.samples)]

    def run(self, model) -> PassResult:
        notes: list[str] = []
        if model.role in self.keep_roles and not self.opts.force:
            notes.append(f"{self.kind}: the {model.role} stays float32 by default (overflow risk); force=true casts it")
            return PassResult(modified=False, stats={"low_nodes": 0, "kept_role": model.role}, notes=notes)
        keep_names = set(match_names(model.graph, self.opts.keep)) if self.opts.keep else set()
        missing = [k for k in self.opts.keep if not match_names(model.graph, [k])]
        if missing:
            raise UsageError(f"pass {self.name!r}: keep={missing[0]!r} matches no node")
        low, kept = plan(model, set(self.opts.block_ops), keep_names)
        stats: dict = {}
        already: set[str] = set()
        feeds = self._samples(model) if (self.opts.overflow_check or self.opts.nan_scan) else []
        if self.opts.overflow_check and low:
            limit = _max_value(self.kind)
            tensors = [o.name for n in model.graph.nodes for o in n.outputs if _is_f32(o)]
            acts, runtime = probe_activations(model, tensors, feeds, runtime="ort")
            already = {name for name, (_, finite) in acts.items() if not finite}
            over = {name for name, (mx, _) in acts.items() if mx > limit}
            # a low node overflows if it writes such a value or must cast one in from float32
            producers = [n for n in low if any(t.name in over for t in list(n.outputs) + list(n.inputs))]
            if producers:
                names = [n.name for n in producers]
                notes.append(f"{len(names)} node(s) would overflow {self.kind} and stay float32: "
                             + ", ".join(names[:10]) + (" ..." if len(names) > 10 else ""))
                log.warning("%s: %s", self.name, notes[-1])
                for n in producers:
                    kept[n.name] = "would overflow"
                low = [n for n in low if n.name not in kept]
            stats["overflow_nodes"] = len(producers)
            stats["overflow_checked"] = sum(1 for n in low for o in n.outputs if _is_f32(o))
        if self.opts.mode == "target":
            model.metadata[PRECISION_MODE_KEY] = json.dumps({"precision": self.kind, "keep": sorted(kept),
                                                             "named": sorted(keep_names & set(kept))})
            stats.update({"mode": "target", "low_nodes": len(low), "kept_nodes": len(kept)})
            return PassResult(modified=True, stats=stats, notes=notes)
        stats.update(cast_graph(model, low, self.kind))
        stats["low_nodes"] = len(low)
        stats["kept_nodes"] = len(kept)
        if self.opts.nan_scan and low:
            bad, runtime = nan_scan(model, feeds, ignore=already)
            stats["nan_scan"] = runtime
            if bad is not None:
                src = bad.inputs[0].inputs[0] if bad.op == "Cast" and bad.name.endswith(f"_to_{self.kind}") and bad.inputs[0].inputs else None
                where = (f"node {src.name!r} ({src.op}), whose float32 output overflows {self.kind} when cast"
                         if src is not None else f"node {bad.name!r} ({bad.op})")
                raise VerificationError(f"{self.name}: NaN/Inf after casting, first produced by {where}")
        return PassResult(modified=bool(low), stats=stats, notes=notes)


def nan_scan(model, feeds, ignore: set[str] = frozenset()) -> tuple[gs.Node | None, str]:
    """The first node (in topological order) whose float output holds NaN/Inf, and the runtime used.

    Tensors in ``ignore`` (already non-finite before casting, e.g. -inf attention masks) and their
    low-precision twins are not reported.
    """
    graph = model.graph.toposort()
    float_types = {np.dtype(np.float32), np.dtype(np.float16)}
    try:
        import ml_dtypes

        float_types.add(np.dtype(ml_dtypes.bfloat16))
    except ImportError:  # pragma: no cover
        pass
    tensors = [o.name for n in graph.nodes for o in n.outputs if o.dtype is not None and np.dtype(o.dtype) in float_types]
    acts, runtime = probe_activations(model, tensors, feeds)
    for n in graph.nodes:
        for o in n.outputs:
            base = o.name.rsplit("_", 1)[0] if o.name.endswith(("_fp16", "_bf16")) else o.name
            if o.name in acts and not acts[o.name][1] and base not in ignore and o.name not in ignore:
                return n, runtime
    return None, runtime


def recorded_precision_mode(model) -> tuple[str, list[str], list[str]] | None:
    """(precision, node names kept in float32, those the user named) recorded by a precision pass run with
    ``mode=target``."""
    raw = model.metadata.get(PRECISION_MODE_KEY)
    if not raw:
        return None
    try:
        rec = json.loads(raw)
        return str(rec["precision"]), [str(k) for k in rec.get("keep", [])], [str(k) for k in rec.get("named", [])]
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{model.name}: metadata {PRECISION_MODE_KEY!r} is not valid ({raw[:60]!r})") from None


def apply_cast_mode(model, precision: str, keep: list[str]) -> dict[str, int]:
    """The cast graph for a recorded precision mode (targets without their own): the recorded keep
    list stays float32, every other candidate is cast; the record is removed."""
    low, _ = plan(model, set(DEFAULT_BLOCK_OPS), set(keep))
    stats = cast_graph(model, low, precision)
    model.metadata.pop(PRECISION_MODE_KEY, None)
    return stats
