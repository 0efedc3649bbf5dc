"""fold: constant folding, shape folding and dead-code removal that never grows the model."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from sdgraph.ir.shapes import infer_shapes, static_shape
from sdgraph.passes.base import Option, Pass, PassResult, register

__all__ = ["Fold"]

log = logging.getLogger(__name__)

_NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"}
_SMALL = 1024  # outputs at most this large always fold (shape vectors, scalars)
_MAX_ROUNDS = 4  # fold rounds; another round runs only after a partial shape fold


def _nbytes(t: gs.Constant) -> int:
    shape = t.shape if t.shape is not None else ()
    return int(np.prod(shape)) * np.dtype(t.dtype).itemsize if t.dtype is not None else 0


@register
class Fold(Pass):
    """Fold what can be computed at compile time, then remove dead nodes.

    Cases handled:
      1. A standard-domain node whose inputs are all constants is evaluated (onnx's reference
         evaluator) and its outputs become constants.
      2. ``Shape``/``Size`` of a tensor whose inferred shape is fully static become constants, and so
         does a Gather/Slice of a partly dynamic ``Shape`` that picks only static dims (dynamic-batch
         or dynamic-size exports: head widths, channel counts); shapes are then inferred again.
      3. Size guard: a fold is skipped when its outputs would exceed the bytes it frees (inputs
         used only by this node) by more than ``max_growth`` (e.g. Tile/Expand of weights, or a
         Transpose of a weight that other nodes still read).
      4. Dead nodes and unused constants are removed; graph inputs are kept.
    """

    name = "fold"
    summary = "Constant and shape folding plus dead-code removal, never growing the model"
    options = (
        Option("max_growth", int, 0, "bytes a fold may add to the model (beyond 1 KiB outputs)", min=0),
        Option("shapes", bool, True, "fold Shape/Size of statically shaped tensors"),
    )

    def run(self, model) -> PassResult:
        graph = model.graph
        nodes_before = len(graph.nodes)
        totals = {"folded": 0, "shape_folded": 0, "skipped_growth": 0, "failed": 0}
        # A partial shape fold (one static dim of a dynamic shape) can make a Reshape's target, and
        # so the next tensors' shapes, known: infer again and fold again until nothing changes.
        for _ in range(_MAX_ROUNDS):
            if self.opts.shapes:
                infer_shapes(model)
            counts = self._round(model)
            for k, v in counts.items():
                totals[k] = totals.get(k, 0) + v
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
            if not counts["partial"]:
                break
        removed = nodes_before - len(graph.nodes)
        stats = {"folded": totals["folded"], "shape_folded": totals["shape_folded"], "nodes_removed": removed}
        if totals["partial"]:
            stats["partial_shape_folded"] = totals["partial"]
        if totals["skipped_growth"]:
            stats["skipped_growth"] = totals["skipped_growth"]
        if totals["failed"]:
            stats["not_evaluable"] = totals["failed"]
        changed = removed > 0 or totals["folded"] > 0 or totals["shape_folded"] > 0 or totals["partial"] > 0
        return PassResult(modified=changed, stats=stats)

    def _round(self, model) -> dict[str, int]:
        graph = model.graph
        folded = shape_folded = partial = skipped_growth = failed = 0
        consumers_count = {}
        for node in graph.nodes:
            for t in node.inputs:
                consumers_count[id(t)] = consumers_count.get(id(t), 0) + 1
        for node in list(graph.toposort().nodes):
            if not node.outputs or (node.domain or "") not in ("", "ai.onnx") or node.op in _NONDETERMINISTIC:
                continue
            if any(isinstance(a, gs.Graph) for a in node.attrs.values()):
                continue
            if self.opts.shapes and node.op in ("Shape", "Size") and isinstance(node.inputs[0], gs.Variable):
                shape = static_shape(node.inputs[0])
                if shape is None:
                    continue
                if node.op == "Shape":
                    start = node.attrs.get("start", 0)
                    end = node.attrs.get("end", None)
                    value = np.array(shape[slice(start, end)], dtype=np.int64)
                else:
                    value = np.array(int(np.prod(shape)), dtype=np.int64)
                node.outputs[0].to_constant(value)
                node.outputs.clear()
                shape_folded += 1
                continue
            if self.opts.shapes and node.op in ("Gather", "Slice"):
                value = _static_part_of_shape(node)
                if value is not None:
                    node.outputs[0].to_constant(value)
                    node.outputs.clear()
                    partial += 1
                    continue
            inputs = node.inputs
            if not all(isinstance(t, gs.Constant) or t.is_empty() for t in inputs):
                continue
            freed = sum(_nbytes(t) for t in inputs if isinstance(t, gs.Constant) and consumers_count.get(id(t), 0) == 1)
            # Predict the output size from shapes when known, to skip big folds before computing them.
            predicted = 0
            for o in node.outputs:
                s = static_shape(o)
                if s is not None and o.dtype is not None:
                    predicted += int(np.prod(s)) * np.dtype(o.dtype).itemsize
            if predicted > max(_SMALL, freed + self.opts.max_growth):
                skipped_growth += 1
                continue
            try:
                values = _evaluate(node, model.opset)
            except Exception as exc:  # unsupported op in the evaluator: leave it
                log.debug("cannot fold %s (%s): %s", node.name, node.op, exc)
                failed += 1
                continue
            out_bytes = sum(v.nbytes for v in values)
            if out_bytes > max(_SMALL, freed + self.opts.max_growth):
                skipped_growth += 1
                continue
            for out, val in zip(node.outputs, values):
                out.to_constant(np.asarray(val))
            node.outputs.clear()
            folded += 1
        return {"folded": folded, "shape_folded": shape_folded, "partial": partial,
                "skipped_growth": skipped_growth, "failed": failed}


def _shape_dims(t: gs.Tensor) -> list | None:
    """The dims ``Shape(x)`` yields for the tensor ``t`` it produced (ints where known), else None."""
    node = t.inputs[0] if isinstance(t, gs.Variable) and len(t.inputs) == 1 else None
    if node is None or node.op != "Shape" or node.inputs[0].shape is None:
        return None
    dims = list(node.inputs[0].shape)
    return dims[slice(node.attrs.get("start", 0), node.attrs.get("end", None))]


def _const_ints(t: gs.Tensor) -> np.ndarray | None:
    return np.asarray(t.values).astype(np.int64) if isinstance(t, gs.Constant) else None


def _static_part_of_shape(node: gs.Node) -> np.ndarray | None:
    """Gather/Slice of a partly dynamic ``Shape`` that picks only static dims, as a constant.

    E.g. the head width of ``Reshape(q, Concat(batch, -1, heads, C / heads))`` on a dynamic-batch
    export: the attention scale is computed from it, and fusing attention needs it constant.
    """
    dims = _shape_dims(node.inputs[0])
    if dims is None:
        return None
    if node.op == "Gather":
        idx = _const_ints(node.inputs[1])
        if idx is None or node.attrs.get("axis", 0) != 0 or idx.size == 0:
            return None
        picked = [dims[int(i)] if -len(dims) <= i < len(dims) else None for i in idx.ravel()]
        shape = idx.shape
    else:
        ins = node.inputs
        starts, ends = _const_ints(ins[1]), _const_ints(ins[2])
        axes = _const_ints(ins[3]) if len(ins) > 3 and not ins[3].is_empty() else np.array([0])
        steps = _const_ints(ins[4]) if len(ins) > 4 and not ins[4].is_empty() else np.array([1])
        if any(v is None or v.size != 1 for v in (starts, ends, axes, steps)) or int(axes[0]) not in (0, -1):
            return None
        picked = dims[slice(int(starts[0]), int(ends[0]), int(steps[0]))]
        shape = (len(picked),)
    if not picked or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in picked):
        return None
    return np.array(picked, dtype=np.int64).reshape(shape)


def _evaluate(node: gs.Node, opset: int) -> list[np.ndarray]:
    """Run one node on its constant inputs with onnx's reference evaluator."""
    from onnx.reference import ReferenceEvaluator

    in_names = [f"i{k}" if not t.is_empty() else "" for k, t in enumerate(node.inputs)]
    out_names = [f"o{k}" for k in range(len(node.outputs))]
    attrs = {}
    for k, v in node.attrs.items():
        if isinstance(v, gs.Constant):
            v = onnx.numpy_helper.from_array(np.asarray(v.values))
        attrs[k] = v
    onode = onnx.helper.make_node(node.op, in_names, out_names, **attrs)
    feeds = {n: np.asarray(t.values) for n, t in zip(in_names, node.inputs) if n}
    ins = [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(feeds[n].dtype), feeds[n].shape)
           for n in in_names if n]
    outs = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in out_names]
    g = onnx.helper.make_graph([onode], "fold", ins, outs)
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", opset)])
    res = ReferenceEvaluator(m).run(None, feeds)
    return [np.asarray(r) for r in res]
