"""Follow one logical axis (ToMe's tokens, the CFG batch) through a graph and resize it, shape-explicitly.

An axis is followed op by op from where it starts (Transpose perms, MatMul's batch/row/column
axes, numpy broadcasting, the position-based axis groups of a Reshape), never by matching
dimension sizes: a token count equal to the channel count, or a batch of 2 equal to a head count
of 2, cannot be confused with it. Where the axis is folded into a wider one (``[B*H, N, D]``) the
plan keeps its place inside that axis as ``dim = outer * n * inner``.

Resizing the axis from ``n`` to ``n_new`` gives every Reshape on its path an explicit target (the
inferred output shape with the axis resized) and rewrites the shape inputs of Expand and
Resize(sizes). Whatever the plan cannot follow (an op it does not know on the path, a fixed-size
operand broadcast against the axis, a slice or gather across it) is refused with the node and the
reason, so a caller never writes a graph with a stale size in it.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx_graphsurgeon as gs

from sdgraph.ir.model import CANONICAL_DOMAIN
from sdgraph.ir.shapes import static_shape

__all__ = ["AxisPlan", "const_ints"]

# Ops whose output keeps every input's axes under numpy broadcasting (right-aligned).
_ELEMENTWISE = frozenset("""
Add Sub Mul Div Pow Where Max Min Mod Sum Mean Erf Sqrt Cast CastLike Relu Gelu FastGelu QuickGelu BiasGelu Sigmoid
HardSigmoid HardSwish Tanh Neg Abs Exp Log Sin Cos Floor Ceil Round Sign Identity Dropout Softmax LogSoftmax Clip
Reciprocal Equal Less LessOrEqual Greater GreaterOrEqual Not And Or Xor IsNaN IsInf Elu LeakyRelu Softplus Mish
QuantizeLinear DequantizeLinear
""".split())
# Ops that carry their first input's axes to their first output; the axis must stay out of
# whatever the op mixes (channels and spatial axes for Conv/normalizations).
_FIRST_INPUT = frozenset("""
Conv ConvTranspose InstanceNormalization BatchNormalization MaxPool AveragePool GlobalAveragePool GlobalMaxPool
""".split())
_REDUCE = frozenset("ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL2 ReduceSumSquare ReduceL1".split())


def const_ints(t: gs.Tensor) -> np.ndarray | None:
    """The values of a small constant (a Constant tensor or a Constant node's output), else None."""
    if isinstance(t, gs.Constant):
        shape = tuple(t.shape or ())
        if len(shape) > 1 or (shape and shape[0] > 8):  # never read weights (they may live on disk)
            return None
        return np.asarray(t.values)
    if t.inputs and t.inputs[0].op == "Constant" and isinstance(t.inputs[0].attrs.get("value"), gs.Constant):
        return np.asarray(t.inputs[0].attrs["value"].values)
    return None


def _rank(t: gs.Tensor) -> int | None:
    return None if t is None or t.shape is None else len(t.shape)


def _dim(t: gs.Tensor, k: int):
    d = t.shape[k]
    return int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None


def _axes_of(node: gs.Node, rank: int, index: int = 1) -> list[int] | None:
    """A node's ``axes`` (input ``index`` or attribute), non-negative; all axes when absent; None if not constant."""
    if len(node.inputs) > index and not node.inputs[index].is_empty():
        vals = const_ints(node.inputs[index])
        if vals is None:
            return None
        axes = [int(v) for v in np.atleast_1d(vals)]
    elif "axes" in node.attrs:
        axes = [int(v) for v in node.attrs["axes"]]
    else:
        return list(range(rank))
    return [a + rank if a < 0 else a for a in axes]


class _Refuse(Exception):
    pass


# Per tensor: {axis: (outer, inner)} with that axis's size = outer * n * inner.
Axes = dict


class AxisPlan:
    """Which axes of each tensor carry the followed axis, and the shape inputs to rewrite for ``n -> n_new``.

    ``start(tensor, axis)`` marks where the axis enters; ``build(nodes)`` walks nodes in
    topological order and returns the reason it cannot follow (``"<op> <node>: why"``) or None;
    ``apply(tag)`` writes the rewritten shape inputs. ``axes_of(tensor)`` tells callers where the
    axis ended up (e.g. a graph output).
    """

    def __init__(self, n: int, n_new: int, leading_expand: bool = False):
        self.n, self.n_new = int(n), int(n_new)
        # the batch axis may also enter through an Expand that broadcasts a size-1 leading axis to n
        # (a UNet's ``timesteps.expand(batch)``, folded to a constant shape)
        self.leading_expand = leading_expand
        self._axes: dict[int, Axes] = {}
        self.rewrites: list[tuple[gs.Node, int, np.ndarray]] = []

    # -- bookkeeping ---------------------------------------------------------------------------
    def start(self, t: gs.Tensor, axis: int) -> None:
        self._axes[id(t)] = {axis: (1, 1)}

    def axes_of(self, t: gs.Tensor) -> Axes:
        return self._axes.get(id(t), {})

    def _set(self, t: gs.Tensor, axes: Axes) -> None:
        if axes:
            self._axes[id(t)] = dict(axes)

    def _resized(self, shape: tuple[int, ...], axes: Axes) -> np.ndarray:
        out = list(shape)
        for k, (outer, inner) in axes.items():
            out[k] = outer * self.n_new * inner
        return np.asarray(out, dtype=np.int64)

    # -- the walk ------------------------------------------------------------------------------
    def build(self, nodes: Iterable[gs.Node]) -> str | None:
        for node in nodes:
            ins = [self.axes_of(t) for t in node.inputs]
            if not any(ins):
                if self.leading_expand and node.op == "Expand":
                    self._leading_expand(node)
                continue
            try:
                self._node(node, ins)
            except _Refuse as why:
                return f"{node.op} {node.name}: {why}"
        return None

    def apply(self, tag: str) -> int:
        """Write every planned shape input as a new constant named ``<node>_<tag>``; returns how many."""
        for k, (node, i, values) in enumerate(self.rewrites):
            node.inputs[i] = gs.Constant(f"{node.name}_{tag}" if node.name else f"{node.op}_{tag}_{k}", values)
        return len(self.rewrites)

    def _node(self, node: gs.Node, ins: list[Axes]) -> None:
        op, out = node.op, node.outputs[0] if node.outputs else None
        if op in ("Shape", "Size"):
            return  # a size computed in-graph follows the tensor by itself
        ro = _rank(out)
        if ro is None or any(_rank(t) is None for t, a in zip(node.inputs, ins) if a):
            raise _Refuse("unknown rank on the path")
        if node.domain == CANONICAL_DOMAIN:
            return self._canonical(node, ins)
        if node.domain not in (None, "", "ai.onnx"):
            raise _Refuse(f"op of domain {node.domain} is not known to keep the axis")
        if op == "Transpose":
            perm = list(node.attrs.get("perm", range(ro - 1, -1, -1)))
            return self._set(out, {perm.index(a): f for a, f in ins[0].items()})
        if op == "Reshape":
            return self._reshape(node, ins[0])
        if op == "MatMul":
            return self._matmul(node, ins)
        if op == "Gemm":
            if node.attrs.get("transA", 0) or any(ins[1:]) or set(ins[0]) != {0}:
                raise _Refuse("Gemm with the axis outside A's rows")
            return self._set(out, ins[0])
        if op in _ELEMENTWISE:
            axes = self._broadcast(node, ins, ro)
            for o in node.outputs[:1] if op == "Dropout" else node.outputs:
                self._set(o, axes)
            return
        if op in _FIRST_INPUT or op == "LayerNormalization":
            if any(ins[1:]):
                raise _Refuse("the axis reaches a parameter input")
            mixed = set(range(int(node.attrs.get("axis", -1)) % ro, ro)) if op == "LayerNormalization" else set(range(1, ro))
            if set(ins[0]) & mixed:
                raise _Refuse("the op mixes values along the axis")
            return self._set(out, ins[0])
        if op in ("Expand", "Tile", "Resize", "Pad"):
            return self._expand_like(node, ins, ro)
        if op in _REDUCE:
            axes = _axes_of(node, _rank(node.inputs[0]), 1 if len(node.inputs) > 1 else 99)
            if axes is None or set(axes) & set(ins[0]):
                raise _Refuse("reduces over the axis (or its axes are not constant)")
            if node.attrs.get("keepdims", 1):
                return self._set(out, ins[0])
            return self._set(out, {k - sum(1 for a in axes if a < k): f for k, f in ins[0].items()})
        if op == "Flatten":
            cut = int(node.attrs.get("axis", 1)) % max(_rank(node.inputs[0]), 1)
            if len(ins[0]) > 1 or any(k != 0 for k in ins[0]) or cut != 1:
                raise _Refuse("flattens the axis together with others")
            return self._set(out, ins[0])
        if op in ("Split", "Slice", "Squeeze", "Unsqueeze", "Concat", "Gather"):
            return self._indexing(node, ins, ro)
        raise _Refuse("op not known to keep the axis")

    def _broadcast(self, node: gs.Node, ins: list[Axes], ro: int) -> Axes:
        axes: Axes = {}
        for t, a in zip(node.inputs, ins):
            r = _rank(t)
            if r is None:
                continue
            for k, f in a.items():
                k2 = ro - r + k
                if axes.get(k2, f) != f:
                    raise _Refuse("two operands fold the axis differently")
                axes[k2] = f
        for t, a in zip(node.inputs, ins):
            r = _rank(t)
            if a or r is None or t.shape is None:
                continue
            for k2 in axes:
                k = k2 - (ro - r)
                if k >= 0 and _dim(t, k) not in (None, 1):
                    raise _Refuse(f"operand {t.name} spans the axis with a fixed size {_dim(t, k)}")
        return axes

    def _reshape(self, node: gs.Node, axes_in: Axes) -> None:
        a, b = static_shape(node.inputs[0]), static_shape(node.outputs[0])
        if a is None or b is None:
            raise _Refuse("needs static shapes (run fold first)")
        axes_out = self._regroup(a, b, axes_in)
        self.rewrites.append((node, 1, self._resized(b, axes_out)))
        self._set(node.outputs[0], axes_out)

    def _regroup(self, a: tuple[int, ...], b: tuple[int, ...], axes_in: Axes) -> Axes:
        """Map the axis through a reshape ``a -> b`` by flat position within each group of equal products."""
        groups = _reshape_groups(a, b)
        if not groups:
            raise _Refuse(f"cannot pair the axes of {list(a)} -> {list(b)}")
        axes_out: Axes = {}
        for k, (outer, _inner) in axes_in.items():
            gi, gj = next(g for g in groups if k in g[0])
            before = int(np.prod([a[i] for i in gi if i < k], dtype=np.int64)) * outer  # major to the axis
            span = before * self.n
            acc = 1
            for j in gj:
                lo, hi = acc, acc * b[j]
                acc = hi
                if before % lo == 0 and hi % span == 0 and lo <= before:
                    if j in axes_out:
                        raise _Refuse("merges two followed axes")
                    axes_out[j] = (before // lo, hi // span)
                    break
            else:
                raise _Refuse(f"splits the axis across {[b[j] for j in gj]}")
        return axes_out

    def _matmul(self, node: gs.Node, ins: list[Axes]) -> None:
        (a, b), out = node.inputs[:2], node.outputs[0]
        ra, rb, ro = _rank(a), _rank(b), _rank(out)
        if ra < 2 or rb < 2:
            raise _Refuse("1-D MatMul on the path")
        if (ra - 1 in ins[0]) != (rb - 2 in ins[1]) or ins[0].get(ra - 1) != ins[1].get(rb - 2):
            raise _Refuse("contracts the axis against a fixed-size axis")
        axes: Axes = {ro - ra + k: f for k, f in ins[0].items() if k != ra - 1}
        for k, f in ins[1].items():
            if k != rb - 2:
                if axes.get(ro - rb + k, f) != f:
                    raise _Refuse("the operands fold the axis differently")
                axes[ro - rb + k] = f
        for t, a_, r in ((a, ins[0], ra), (b, ins[1], rb)):
            for k2 in axes:
                k = k2 - (ro - r)
                if not a_.get(k) and 0 <= k < r - 2 and _dim(t, k) not in (None, 1):
                    raise _Refuse(f"operand {t.name} spans the axis with a fixed size {_dim(t, k)}")
        self._set(out, axes)

    def _expand_like(self, node: gs.Node, ins: list[Axes], ro: int) -> None:
        op, out = node.op, node.outputs[0]
        if any(ins[1:]):
            raise _Refuse("the axis reaches a shape input")
        r = _rank(node.inputs[0])
        axes = {ro - r + k: f for k, f in ins[0].items()}
        if op == "Tile":
            reps = const_ints(node.inputs[1])
            if reps is None or any(int(reps[k]) != 1 for k in ins[0]):
                raise _Refuse("tiles along the axis (or its repeats are not constant)")
        elif op == "Pad":
            pads = const_ints(node.inputs[1]) if len(node.inputs) > 1 else np.asarray(node.attrs.get("pads", []))
            if pads is None or len(node.inputs) > 3 and not node.inputs[3].is_empty() or any(
                    int(pads[k]) or int(pads[k + r]) for k in ins[0]):
                raise _Refuse("pads along the axis (or its pads are not constant)")
        else:  # Expand: explicit target shape; Resize: explicit sizes, scales must keep the axis
            index = 1 if op == "Expand" else 3
            shape = static_shape(out)
            if op == "Resize":
                scales = const_ints(node.inputs[2]) if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
                if scales is not None and len(scales) and any(float(scales[k]) != 1.0 for k in ins[0]):
                    raise _Refuse("resizes along the axis")
            if len(node.inputs) > index and not node.inputs[index].is_empty():
                if shape is None:
                    raise _Refuse("needs static shapes (run fold first)")
                self.rewrites.append((node, index, self._resized(shape, axes)))
        self._set(out, axes)

    def _leading_expand(self, node: gs.Node) -> None:
        x, out = node.inputs[0], node.outputs[0]
        shape = static_shape(out)
        r = _rank(x)
        if shape is None or r is None or not shape or shape[0] != self.n or (r == len(shape) and _dim(x, 0) != 1):
            return
        self.rewrites.append((node, 1, self._resized(shape, {0: (1, 1)})))
        self._set(out, {0: (1, 1)})

    def _indexing(self, node: gs.Node, ins: list[Axes], ro: int) -> None:
        op, x = node.op, node.inputs[0]
        r = _rank(x)
        a = ins[0]
        if op == "Concat":
            axis = int(node.attrs.get("axis", 0)) % ro
            merged: Axes = {}
            for ax in ins:
                if not ax or axis in ax or any(merged.get(k, f) != f for k, f in ax.items()):
                    raise _Refuse("concatenates along or with the axis")
                merged.update(ax)
            return self._set(node.outputs[0], merged)
        if op in ("Split", "Gather"):
            axis = int(node.attrs.get("axis", 0)) % r
            if axis in a or (op == "Gather" and ins[1]):
                raise _Refuse("indexes along the axis")
            if op == "Gather":
                shift = ro - r
                return self._set(node.outputs[0], {k if k < axis else k + shift: f for k, f in a.items()})
            for o in node.outputs:
                self._set(o, a)
            return
        if op == "Slice":
            axes = _axes_of(node, r, 3)
            if axes is None or set(axes) & set(a):
                raise _Refuse("slices along the axis (or its axes are not constant)")
            return self._set(node.outputs[0], a)
        axes = _axes_of(node, ro if op == "Unsqueeze" else r)
        if axes is None:
            raise _Refuse("axes are not constant")
        if op == "Squeeze":
            if set(axes) & set(a):
                raise _Refuse("squeezes the axis")
            return self._set(node.outputs[0], {k - sum(1 for s in axes if s < k): f for k, f in a.items()})
        kept = [k for k in range(ro) if k not in axes]
        self._set(node.outputs[0], {kept[k]: f for k, f in a.items()})

    def _canonical(self, node: gs.Node, ins: list[Axes]) -> None:
        """sdgraph's canonical ops (sdgraph.ir.canonical, canonical_tome): which axes each passes through."""
        op = node.op
        if op.startswith("Attention"):  # q, k, v [B, H, S, D] (+ mask): batch and sequence pass through q
            if any(set(x) - {0, 2} for x in ins[:3]) or any(ins[3:]):
                raise _Refuse("the axis is not attention's batch or sequence axis")
            return self._set(node.outputs[0], ins[0])
        if op.startswith("GroupNorm"):
            if any(ins[1:]) or set(ins[0]) - {0}:
                raise _Refuse("the axis is not GroupNorm's batch axis")
            return self._set(node.outputs[0], ins[0])
        if op == "GeGLU":
            if _rank(node.inputs[0]) - 1 in ins[0]:
                raise _Refuse("the axis is the gated (last) axis")
            return self._set(node.outputs[0], ins[0])
        if op in ("TomeMerge", "TomeMergeShared", "TomeUnmerge"):  # batch only: the token axis is what they resize themselves
            carried = [x for x in ins if x]
            if any(set(x) != {0} for x in carried) or len({tuple(x.items()) for x in carried}) > 1:
                raise _Refuse("ToMe ops pass only the batch axis")
            for o in node.outputs:
                self._set(o, carried[0])
            return
        raise _Refuse("canonical op not known to keep the axis")


def _reshape_groups(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair the axes of a reshape ``a -> b`` into minimal groups with equal products (by position)."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        gi, gj, pa, pb = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                gi.append(i)
                pa *= a[i]
                i += 1
            elif pb < pa and j < len(b):
                gj.append(j)
                pb *= b[j]
                j += 1
            else:
                return []
        groups.append((gi, gj))
    if groups:  # trailing size-1 axes join the last group
        groups[-1][0].extend(range(i, len(a)))
        groups[-1][1].extend(range(j, len(b)))
    return groups
