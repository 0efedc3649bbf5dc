"""todo: token downsampling (ToDo, Smith et al. 2024): self-attention keys/values from a spatially pooled token grid."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_graphsurgeon as gs

from sdgraph.errors import PassError
from sdgraph.ir.axes import AxisPlan
from sdgraph.ir.build import GraphBuilder
from sdgraph.ir.model import CANONICAL_DOMAIN
from sdgraph.ir.shapes import infer_shapes
from sdgraph.limits import TODO_MAX_FACTOR
from sdgraph.passes.base import Option, Pass, PassResult, register
from sdgraph.passes.tome import Region, TomeBlock, find_blocks, select_blocks

__all__ = ["Todo", "METHODS"]

log = logging.getLogger(__name__)

# How a factor x factor cell of tokens becomes one key/value token: the picked row/column inside the
# cell (torch's F.interpolate nearest-exact: floor((i + 0.5) * f) = i*f + f//2; nearest: i*f), or the mean.
METHODS = ("nearest-exact", "nearest", "avg")
_SKIP = frozenset({"Cast", "Dropout", "Identity"})  # between Softmax and the probabilities' MatMul


@dataclasses.dataclass
class _Core:
    """The attention core of a self-attention sub-layer: the tensors that carry q, k and v into it."""

    q: gs.Tensor
    kv: list[gs.Tensor]


class _Mismatch(Exception):
    pass


def _core(reg: Region) -> _Core:
    """q and k/v of the one attention in ``reg``: a canonical Attention, or MatMul -> Softmax -> MatMul."""
    fused = [n for n in reg.nodes if n.domain == CANONICAL_DOMAIN and n.op.startswith("Attention")]
    soft = [n for n in reg.nodes if n.op == "Softmax"]
    other = [n for n in reg.nodes if n.op in ("Attention", "MultiHeadAttention", "ScaledDotProductAttention")
             and n.domain != CANONICAL_DOMAIN]
    if other:
        raise _Mismatch(f"attention op {other[0].op} ({other[0].domain or 'onnx'}) is not split into q/k/v here: "
                        "run todo before ort_contrib")
    if len(fused) + len(soft) != 1:
        raise _Mismatch(f"{len(fused) + len(soft)} attention cores in the sub-layer, expected 1")
    if fused:
        return _Core(fused[0].inputs[0], list(fused[0].inputs[1:3]))
    sm = soft[0]
    t = sm.inputs[0]
    while t.inputs and t.inputs[0].op != "MatMul":  # scale / mask in front of the Softmax
        node = t.inputs[0]
        live = [x for x in node.inputs if not isinstance(x, gs.Constant) and x.inputs and x.inputs[0].op != "Constant"]
        if len(live) != 1:
            raise _Mismatch(f"{node.op} {node.name} between the scores MatMul and the Softmax has {len(live)} inputs")
        t = live[0]
    if not t.inputs:
        raise _Mismatch("no MatMul computes the Softmax's scores")
    scores = t.inputs[0]
    probs = sm.outputs[0]
    while True:
        nxt = [c for c in probs.outputs]
        if len(nxt) != 1:
            raise _Mismatch(f"the attention probabilities feed {len(nxt)} nodes")
        if nxt[0].op == "MatMul" and nxt[0].inputs[0] is probs:
            return _Core(scores.inputs[0], [scores.inputs[1], nxt[0].inputs[1]])
        if nxt[0].op not in _SKIP:
            raise _Mismatch(f"the attention probabilities reach {nxt[0].op} {nxt[0].name}, not the values' MatMul")
        probs = nxt[0].outputs[0]


def _ancestors(ts: list[gs.Tensor], inside: set[int]) -> set[int]:
    """ids of the nodes in ``inside`` whose values ``ts`` depend on (a Shape/Size reads no values: the
    legacy export sizes the query's heads from ``key.shape``, which is no data dependency)."""
    seen: set[int] = set()
    stack = [t for t in ts]
    while stack:
        t = stack.pop()
        for node in t.inputs:
            if node.op in ("Shape", "Size"):
                continue
            if id(node) in inside and id(node) not in seen:
                seen.add(id(node))
                stack.extend(node.inputs)
    return seen


def _rewire(nodes: list[gs.Node], old: gs.Tensor, new: gs.Tensor) -> None:
    for c in nodes:
        for i, t in enumerate(c.inputs):
            if t is old:
                c.inputs[i] = new


@register
class Todo(Pass):
    """Token downsampling (ToDo, Smith et al. 2024): keys and values of self-attention from a pooled token grid.

    1. Finds the transformer blocks as ``tome`` does (``sdgraph.passes.tome.find_blocks``: LayerNorm ->
       sub-layer -> residual Add, self-attention = the sub-layer with attention and no other input)
       and picks them the same way: ``todo`` alone the blocks at downsample <= ``max_downsample``
       (0: the highest resolution only, as ToDo's default), ``todo:N`` the first N, highest
       resolution first.
    2. In each picked block's self-attention, finds the attention core (a canonical ``Attention``
       after ``fa``, or MatMul -> Softmax -> MatMul) and the readers of the LayerNorm output that
       feed its keys and values (not its queries). Both exporters and SD1.x/2.x/XL layouts work;
       a fused QKV projection (one MatMul for all three) is a near miss.
    3. Pools the normalized hidden states [B, N, C] on the h x w token grid by ``factor`` in each
       spatial dimension: Reshape [B, h/f, f, w/f, f, C], then Gather of one row and one column per
       cell (``nearest-exact``, ToDo's default: the token at i*f + f//2; ``nearest``: i*f) or
       ReduceMean over the cell (``avg``), and Reshape [B, N/f², C]. Only the key/value projections
       read it; queries keep every token, so the output keeps N tokens: no unmerge, no similarity,
       no TopK.
    4. The key/value token axis is followed op by op (``sdgraph.ir.axes.AxisPlan``) to the attention
       core, and every Reshape on it gets an explicit target with N/f² tokens.
    5. Skips (near miss with the reason) a block whose grid is not divisible by ``factor`` or whose
       attention cannot be split as above; refuses dynamic spatial axes with one line.
    """

    name = "todo"
    summary = "token downsampling (ToDo): self-attention keys/values from a pooled token grid"
    exact = False
    pattern = True
    roles = ("unet",)
    options = (
        Option("blocks", int, 0, "pool the first N transformer blocks, highest resolution first (0: by max_downsample)",
               positional=True, min=0),
        Option("factor", int, 2, "pooling factor in each spatial dimension (keys/values: N / factor²)",
               min=2, max=TODO_MAX_FACTOR),
        Option("method", str, "nearest-exact", "how a cell becomes one token (ToDo's default: nearest-exact)",
               choices=METHODS),
        Option("max_downsample", int, 0, "pool blocks with at most this downsampling (0: 1, or all when N is given)",
               min=0),
        Option("min_cosine", float, None, "fail --verify below this output cosine"),
    )

    def run(self, model) -> PassResult:
        model.graph.toposort()
        infer_shapes(model)
        blocks, misses, candidates = find_blocks(model)
        result = PassResult(False, {"blocks_found": len(blocks), "blocks_pooled": 0, "kv_tokens_removed": 0})
        result.expected = candidates
        self._pooled: list[tuple[str, int]] = []
        self._opset = model.opset
        if not blocks:
            result.matched = 0
            return result
        chosen, note = select_blocks(model, blocks, self.opts.blocks, self.opts.max_downsample, who="todo")
        if note:
            result.notes.append(note)
        result.expected = len(chosen)
        position = {id(n): i for i, n in enumerate(model.graph.nodes)}
        builder = GraphBuilder(model.graph)
        f = self.opts.factor
        for b in chosen:
            reg = b.regions["attn"]
            if b.h * b.w != b.tokens:
                misses.append((b.name, f"{b.tokens} tokens do not form the {b.h}x{b.w} grid of the latent"))
                continue
            if b.h % f or b.w % f:
                misses.append((b.name, f"the {b.h}x{b.w} token grid is not divisible by factor {f}"))
                continue
            why = self._pool_block(builder, b, reg, position)
            if why:
                misses.append((b.name, why))
                continue
            result.stats["blocks_pooled"] += 1
            result.stats["kv_tokens_removed"] += b.tokens - b.tokens // (f * f)
        result.matched = result.stats["blocks_pooled"]
        if result.matched:
            model.graph.cleanup().toposort()
            infer_shapes(model)
            result.modified = True
        if self.debug:
            result.near_misses = list(misses)
        log.info("todo: pooled keys/values in %d of %d blocks (factor %d, %s)", result.matched, len(chosen), f,
                 self.opts.method)
        return result

    def _pool_block(self, builder: GraphBuilder, b: TomeBlock, reg: Region, position: dict[int, int]) -> str:
        """Route the block's key/value projections through a pooled copy of the LayerNorm output; '' when done."""
        y = reg.norm.outputs[0]
        try:
            core = _core(reg)
        except _Mismatch as why:
            return str(why)
        inside = {id(n) for n in reg.nodes}
        q_side = _ancestors([core.q], inside)
        kv_side = _ancestors(core.kv, inside)
        readers = [c for c in y.outputs]
        kv_readers = [c for c in readers if id(c) in kv_side]
        if not kv_readers or any(id(c) in q_side for c in kv_readers):
            return "keys/values are not projected apart from the queries (a fused QKV projection?)"
        if any(id(c) not in q_side for c in readers if id(c) not in kv_side):
            return "the LayerNorm output feeds more than the q/k/v projections"
        f, n = self.opts.factor, b.tokens
        n_new = n // (f * f)
        base = b.name.replace("/", "_").strip("_") + "_todo"
        bsz, chans = y.shape[0], y.shape[2]
        pooled = builder.var(f"{base}_kv", dtype=y.dtype, shape=list(y.shape))  # the old shape while planning
        _rewire(kv_readers, y, pooled)
        plan = AxisPlan(n, n_new)
        plan.start(pooled, 1)
        why = plan.build(sorted(reg.nodes, key=lambda nd: position.get(id(nd), 0)))
        if why:
            _rewire(kv_readers, pooled, y)
            return f"keys/values: {why}"
        plan.apply("todo_shape")
        for node in reg.nodes:  # shapes downstream of k/v (scores, probabilities) are re-inferred
            for o in node.outputs:
                o.shape = None
        h2, w2 = b.h // f, b.w // f
        cells = builder.op("Reshape", [y, np.array([0, h2, f, w2, f, chans], np.int64)], name=f"{base}_cells", dtype=y.dtype)
        if self.opts.method == "avg":
            if self._opset >= 18:
                grid = builder.op("ReduceMean", [cells, np.array([2, 4], np.int64)], name=f"{base}_mean",
                                  attrs={"keepdims": 0}, dtype=y.dtype)
            else:
                grid = builder.op("ReduceMean", [cells], name=f"{base}_mean", attrs={"axes": [2, 4], "keepdims": 0},
                                  dtype=y.dtype)
        else:
            off = np.array(f // 2 if self.opts.method == "nearest-exact" else 0, np.int64)
            rows = builder.op("Gather", [cells, off], name=f"{base}_row", attrs={"axis": 2}, dtype=y.dtype)
            grid = builder.op("Gather", [rows, off], name=f"{base}_col", attrs={"axis": 3}, dtype=y.dtype)
        builder.op("Reshape", [grid, np.array([0, n_new, chans], np.int64)], name=f"{base}_tokens", out=pooled)
        pooled.shape = [bsz, n_new, chans]
        self._pooled.append((pooled.name, n_new))
        return ""

    def ensures(self, model) -> None:
        tensors = model.graph.tensors()
        for name, n_new in getattr(self, "_pooled", []):
            t = tensors.get(name)
            if t is None or not t.outputs:
                raise PassError(f"todo: pooled keys/values {name} were lost")
            if t.shape is not None and len(t.shape) == 3 and isinstance(t.shape[1], (int, np.integer)) and t.shape[1] != n_new:
                raise PassError(f"todo: pooled keys/values {name} have {t.shape[1]} tokens, expected {n_new}")
