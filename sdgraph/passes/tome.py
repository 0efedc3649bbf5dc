"""tome: token merging (ToMe for SD, tomesd's algorithm) around UNet transformer blocks, as graph surgery."""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import onnx_graphsurgeon as gs

from sdgraph.errors import PassError, UnsupportedError
from sdgraph.ir.axes import AxisPlan
from sdgraph.ir.build import GraphBuilder
from sdgraph.ir.canonical_tome import (MIN_OPSET, TOME_MERGE, TOME_MERGE_SHARED, TOME_UNMERGE, make_tome_functions,
                                       make_tome_shared_function)
from sdgraph.ir.model import CANONICAL_DOMAIN
from sdgraph.ir.shapes import infer_shapes, static_shape
from sdgraph.passes.base import Option, Pass, PassResult, register

__all__ = ["Tome", "TomeBlock", "find_blocks", "select_blocks", "tome_indices", "estimate"]

log = logging.getLogger(__name__)

_REGION_CAP = 600  # nodes: a transformer sub-layer is ~20-80; more means the walk escaped
_ATTENTION_OPS = {"Softmax", "Attention", "MultiHeadAttention", "ScaledDotProductAttention"}


@dataclasses.dataclass
class Region:
    """One sub-layer of a transformer block: LayerNorm -> ... -> residual Add."""

    norm: gs.Node  # the LayerNormalization node
    add: gs.Node  # the residual Add
    branch: gs.Tensor  # the Add operand coming from the sub-layer
    nodes: list[gs.Node]  # nodes between norm output and branch
    kind: str  # "attn" | "crossattn" | "mlp"


@dataclasses.dataclass
class TomeBlock:
    """A transformer block found structurally: its input, token count and sub-layer regions."""

    name: str
    hidden: gs.Tensor  # block input [B, N, C] = the similarity metric
    tokens: int
    regions: dict[str, Region]
    downsample: int = 1
    h: int = 0
    w: int = 0


def _consumers(t: gs.Tensor) -> list[gs.Node]:
    return list(t.outputs)


def _region_after(norm: gs.Node) -> tuple[Region | None, str]:
    """Walk from a LayerNorm to the residual Add that closes its sub-layer."""
    h, y = norm.inputs[0], norm.outputs[0]
    adds = [n for n in _consumers(h) if n.op == "Add" and n is not norm]
    for add in adds:
        other = add.inputs[1] if add.inputs[0] is h else add.inputs[0]
        if other is h:
            continue
        nodes: dict[int, gs.Node] = {}
        leaves: set[int] = set()
        stack, seen, reached = [other], set(), False
        while stack:
            t = stack.pop()
            if id(t) in seen:
                continue
            seen.add(id(t))
            if t is y:
                reached = True
                continue
            if isinstance(t, gs.Constant) or not t.inputs:
                if not isinstance(t, gs.Constant):
                    leaves.add(id(t))
                continue
            node = t.inputs[0]
            if node is norm or node.op == "Constant":
                continue
            if id(node) not in nodes:
                nodes[id(node)] = node
                if len(nodes) > _REGION_CAP:
                    break
                stack.extend(node.inputs)
        if not reached or len(nodes) > _REGION_CAP:
            continue
        region_nodes = list(nodes.values())
        inside = set(nodes)
        for n in region_nodes:
            for o in n.outputs:
                for c in o.outputs:
                    if id(c) not in inside and c is not add:
                        return None, f"sub-layer output {o.name} escapes to {c.name}"
        for c in _consumers(y):
            if id(c) not in inside:
                return None, f"LayerNorm output also feeds {c.name} outside the sub-layer"
        ops = {n.op for n in region_nodes}
        if ops & _ATTENTION_OPS:
            kind = "crossattn" if leaves else "attn"
        else:
            kind = "mlp"
        return Region(norm, add, other, region_nodes, kind), ""
    return None, "no residual Add closes it"


def find_blocks(model) -> tuple[list[TomeBlock], list[tuple[str, str]], int]:
    """Transformer blocks in graph order: (blocks, near misses, self-attention candidates)."""
    graph = model.graph
    blocks: list[TomeBlock] = []
    misses: list[tuple[str, str]] = []
    regions: dict[int, Region] = {}
    for node in graph.nodes:
        if node.op != "LayerNormalization":
            continue
        reg, why = _region_after(node)
        if reg is None:
            misses.append((node.name, why))
            continue
        regions[id(node)] = reg
    by_input = {id(r.norm.inputs[0]): r for r in regions.values()}
    candidates = 0
    for reg in regions.values():
        if reg.kind != "attn":
            continue
        candidates += 1
        hidden = reg.norm.inputs[0]
        shape = hidden.shape
        # the batch may be symbolic (SDXL's legacy export before fold); tokens and channels may not
        if shape is None or len(shape) != 3 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape[1:]):
            raise UnsupportedError(
                f"tome needs static token shapes [batch, tokens, channels]; {hidden.name} has {hidden.shape} "
                "(export or fix the UNet at a static latent size: tome does not compute sizes in-graph)"
            )
        chain = {"attn": reg}
        nxt = by_input.get(id(reg.add.outputs[0]))
        if nxt is not None and nxt.kind == "crossattn":
            chain["crossattn"] = nxt
            nxt = by_input.get(id(nxt.add.outputs[0]))
        if nxt is not None and nxt.kind == "mlp":
            chain["mlp"] = nxt
        blocks.append(TomeBlock(reg.norm.name, hidden, int(shape[1]), chain))
    return blocks, misses, candidates


def _latent_hw(model, blocks: list[TomeBlock], who: str = "tome") -> tuple[int, int]:
    for t in model.graph.inputs:
        if t.shape is not None and len(t.shape) == 4:
            hw = t.shape[2:]
            if all(isinstance(d, (int, np.integer)) and d > 0 for d in hw):
                return int(hw[0]), int(hw[1])
            raise UnsupportedError(
                f"{who} needs a static latent height/width; input {t.name} has shape {list(t.shape)} "
                f"({who} does not compute sizes in-graph: export or fix the UNet at the size you run)"
            )
    n0 = max(b.tokens for b in blocks)
    side = math.isqrt(n0)
    if side * side != n0:
        raise UnsupportedError(f"{who} cannot tell the latent height/width (no 4-D input; {n0} tokens is not square)")
    return side, side


def select_blocks(model, blocks: list[TomeBlock], n: int, max_downsample: int, who: str = "tome") -> tuple[list[TomeBlock], str]:
    """Set each block's downsample and token grid (tomesd's rule) and pick blocks as ``who:N{max_downsample=}``.

    ``n`` > 0: the first n blocks, highest resolution first (graph order within one); else all with
    downsample <= ``max_downsample`` (0: 1). Returns (chosen, a note when none qualifies).
    """
    lh, lw = _latent_hw(model, blocks, who)
    n0 = lh * lw
    for b in blocks:
        b.downsample = int(math.ceil(math.sqrt(n0 // b.tokens))) if b.tokens <= n0 else 1
        b.h, b.w = int(math.ceil(lh / b.downsample)), int(math.ceil(lw / b.downsample))
    max_ds = max_downsample or (1 if n == 0 else 1 << 30)
    chosen = [b for b in blocks if b.downsample <= max_ds]
    chosen.sort(key=lambda b: b.downsample)  # stable: graph order within a resolution
    if n:
        chosen = chosen[:n]
    note = ""
    if not chosen:
        lowest = min(b.downsample for b in blocks)
        note = (f"no transformer block at downsample <= {max_ds} (this UNet's attention starts at downsample "
                f"{lowest}, as SDXL's); {'tomesd' if who == 'tome' else 'ToDo'} with the same max_downsample changes none either: "
                f"use {who}{{max_downsample={lowest}}} or {who}:N")
    return chosen, note


def tome_indices(h: int, w: int, sx: int, sy: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(src_idx, dst_idx) for an h x w token grid: one destination per full sy x sx cell.

    Without ``rng`` the destination is each cell's first (top-left) token, as tomesd with
    ``use_rand=False``; rows/columns past the last full cell are all sources.
    """
    hsy, wsx = h // sy, w // sx
    if rng is None:
        pick = np.zeros((hsy, wsx), dtype=np.int64)
    else:
        pick = rng.integers(0, sy * sx, size=(hsy, wsx))
    is_dst = np.zeros((h, w), dtype=bool)
    ii, jj = np.meshgrid(np.arange(hsy), np.arange(wsx), indexing="ij")
    is_dst[ii * sy + pick // sx, jj * sx + pick % sx] = True
    flat = is_dst.reshape(-1)
    return np.flatnonzero(~flat).astype(np.int64), np.flatnonzero(flat).astype(np.int64)


def _merge_count(tokens: int, ratio: float, n_src: int) -> int:
    return min(int(tokens * ratio), n_src)  # tomesd: r = int(N * ratio), at most |src|


@register
class Tome(Pass):
    """Token merging around the transformer blocks' attention (ToMe for SD, tomesd's algorithm).

    1. Finds each transformer block structurally: a LayerNormalization whose output reaches, and
       only reaches, the other operand of the residual Add on its input; a sub-layer with Softmax
       (or a fused ``Attention``) and no other activation input is self-attention, with one
       (encoder states) cross-attention, without attention an MLP. Works before and after ``fa``.
    2. Picks blocks by resolution: ``tome:N`` the first N blocks, highest resolution first (the
       Ascend seed's TOME_num); ``tome`` alone all blocks with downsample <= ``max_downsample``.
    3. Inserts TomeMerge after the LayerNorm (metric = block input, as tomesd) and TomeUnmerge in
       front of the residual Add, for self-attention and optionally cross-attention / MLP. The
       sub-layers of one block share one similarity (tomesd's ``compute_merge`` once per block): the
       first merged sub-layer's TomeMerge computes the matching, the others' TomeMergeShared reuse
       its ``order`` / ``node_idx``. Inside
       the merged sub-layer the token axis is followed op by op (never guessed from sizes) and
       every Reshape on it gets an explicit target with the merged token count.
    4. Destinations are constants: the first token of each sx*sy cell (tomesd, use_rand=False)
       or, with ``random=true``, one per cell from ``numpy.random.default_rng(seed)`` (one draw per
       block, graph order). The canonical ops are in :mod:`sdgraph.ir.canonical_tome`.
    5. Skips blocks whose sub-layer cannot be resized (a near miss says why); refuses dynamic
       spatial axes (sizes are not computed in-graph) and opset < 16 with one line.
    """

    name = "tome"
    summary = "token merging (ToMe, tomesd algorithm) around transformer-block attention"
    exact = False
    pattern = True
    roles = ("unet",)
    options = (
        Option("blocks", int, 0, "merge the first N transformer blocks, highest resolution first (0: by max_downsample)",
               positional=True, min=0),
        Option("ratio", float, 0.5, "fraction of tokens merged (tomesd ratio)", min=0.0, max=0.99),
        Option("sx", int, 2, "destination stride along width", min=1),
        Option("sy", int, 2, "destination stride along height", min=1),
        Option("random", bool, False, "one random destination per cell instead of the first"),
        Option("seed", int, 0, "seed for random=true"),
        Option("max_downsample", int, 0, "merge blocks with at most this downsampling (0: 1, or all when N is given)",
               min=0),
        Option("attn", bool, True, "merge around self-attention"),
        Option("crossattn", bool, False, "merge around cross-attention"),
        Option("mlp", bool, False, "merge around the MLP"),
        Option("min_cosine", float, None, "fail --verify below this output cosine"),
    )

    def run(self, model) -> PassResult:
        if not (self.opts.attn or self.opts.crossattn or self.opts.mlp):
            raise PassError("tome: nothing to merge (attn, crossattn and mlp are all false)")
        if model.opset < MIN_OPSET:
            raise UnsupportedError(f"tome needs opset >= {MIN_OPSET} (ScatterElements with reduction); model has {model.opset}")
        model.graph.toposort()
        infer_shapes(model)
        blocks, misses, candidates = find_blocks(model)
        position = {id(n): i for i, n in enumerate(model.graph.nodes)}
        result = PassResult(False, {"blocks_found": len(blocks), "blocks_merged": 0, "tokens_removed": 0})
        result.expected = candidates
        if self.debug:
            result.near_misses = list(misses)
        if not blocks:
            result.matched = 0
            return result
        chosen, note = select_blocks(model, blocks, self.opts.blocks, self.opts.max_downsample)
        if note:
            result.notes.append(note)
        result.expected = len(chosen)
        merge_fn, unmerge_fn = make_tome_functions(model.opset)
        rng = np.random.default_rng(self.opts.seed) if self.opts.random else None
        kinds = [k for k in ("attn", "crossattn", "mlp") if getattr(self.opts, k)]
        merged = 0
        builder = GraphBuilder(model.graph)
        shared = 0
        for b in chosen:
            if b.h * b.w != b.tokens:
                misses.append((b.name, f"{b.tokens} tokens do not form the {b.h}x{b.w} grid of the latent"))
                continue
            src, dst = tome_indices(b.h, b.w, self.opts.sx, self.opts.sy, rng)
            r = _merge_count(b.tokens, self.opts.ratio, len(src))
            if r <= 0 or len(dst) == 0:
                misses.append((b.name, f"ratio {self.opts.ratio} merges no token of {b.tokens}"))
                continue
            done = self._merge_block(builder, b, kinds, src, dst, r, position, misses)
            if done:
                merged += 1
                shared += done - 1
                result.stats["tokens_removed"] += r * done
        result.matched = merged
        result.stats["blocks_merged"] = merged
        result.stats["similarities"] = merged  # one per merged block, shared by its sub-layers
        if merged:
            model.add_function(merge_fn)
            model.add_function(unmerge_fn)
            if shared:
                model.add_function(make_tome_shared_function(model.opset))
            model.graph.cleanup().toposort()
            infer_shapes(model)
            result.modified = True
        if self.debug:
            result.near_misses = list(misses)
        log.info("tome: merged %d of %d blocks (ratio %s)", merged, len(chosen), self.opts.ratio)
        return result

    def _merge_block(self, builder: GraphBuilder, b: TomeBlock, kinds: list[str], src: np.ndarray, dst: np.ndarray, r: int,
                     position: dict[int, int], misses: list) -> int:
        """Merge the block's ``kinds`` sub-layers; the first computes the matching, the others share it."""
        base = b.name.replace("/", "_").strip("_") + "_tome"
        src_c = builder.const(f"{base}_src_idx", src)
        dst_c = builder.const(f"{base}_dst_idx", dst)
        match: list[gs.Variable] = []  # (order, node_idx) of the block's TomeMerge
        count = 0
        for kind in kinds:
            reg = b.regions.get(kind)
            if reg is None:
                continue
            y = reg.norm.outputs[0]
            plan = AxisPlan(b.tokens, b.tokens - r)  # the token axis, followed op by op
            plan.start(y, 1)
            why = plan.build(sorted(reg.nodes, key=lambda nd: position.get(id(nd), 0)))
            if why:
                misses.append((b.name, f"{kind}: {why}"))
                continue
            plan.apply("tome_shape")
            dtype = y.dtype
            bsz, chans = b.hidden.shape[0], b.hidden.shape[2]
            merged = builder.var(f"{base}_{kind}_merged", dtype=dtype, shape=[bsz, b.tokens - r, chans])
            for c in list(y.outputs):
                for i, t in enumerate(c.inputs):
                    if t is y:
                        c.inputs[i] = merged
            if not match:
                match = [builder.var(f"{base}_{what}", dtype=np.int64, shape=[bsz, len(src)]) for what in ("order", "node_idx")]
                builder.node(TOME_MERGE, [y, b.hidden, src_c, dst_c], [merged, *match], name=f"{base}_{kind}_merge",
                             attrs={"r": r}, domain=CANONICAL_DOMAIN)
            else:
                builder.node(TOME_MERGE_SHARED, [y, src_c, dst_c, *match], [merged], name=f"{base}_{kind}_merge",
                             attrs={"r": r}, domain=CANONICAL_DOMAIN)
            for n in reg.nodes:
                for o in n.outputs:
                    o.shape = None
            out = builder.var(f"{base}_{kind}_unmerged", dtype=dtype, shape=list(b.hidden.shape))
            builder.node(TOME_UNMERGE, [reg.branch, src_c, dst_c, *match], [out], name=f"{base}_{kind}_unmerge",
                         attrs={"r": r}, domain=CANONICAL_DOMAIN)
            for i, t in enumerate(reg.add.inputs):
                if t is reg.branch:
                    reg.add.inputs[i] = out
            count += 1
        return count


def _flops(model) -> int:
    """Multiply-add FLOPs (x2) of MatMul/Gemm/Conv nodes whose shapes are static after inference."""
    total = 0
    for node in model.graph.nodes:
        if node.op not in ("MatMul", "Gemm", "Conv") or not node.outputs:
            continue
        out = static_shape(node.outputs[0])
        a = static_shape(node.inputs[0]) if node.inputs else None
        w = static_shape(node.inputs[1]) if len(node.inputs) > 1 else None
        if out is None or a is None or w is None:
            continue
        if node.op == "MatMul":
            total += 2 * int(np.prod(out)) * a[-1]
        elif node.op == "Gemm":
            total += 2 * int(np.prod(out)) * (a[0] if node.attrs.get("transA", 0) else a[-1])
        else:
            total += 2 * int(np.prod(out)) * int(np.prod(w[1:]))
    return total


def estimate(model, **options) -> dict:
    """FLOPs of the UNet before and after ``tome`` with ``options``, and the Amdahl speed-up.

    Counts MatMul/Gemm/Conv FLOPs on the graph as exported (static shapes), applies the pass to a
    copy, counts again and adds the merge's own similarity MatMul (2*B*Ns*Nd*C per merge). The
    model is not changed.
    """
    before = model.copy()
    infer_shapes(before)
    flops_before = _flops(before)
    after = model.copy()
    p = Tome(**options)
    res = p(after)
    flops_after = _flops(after)
    overhead = 0
    for node in after.graph.nodes:
        if node.op == TOME_MERGE and node.domain == CANONICAL_DOMAIN:
            x = static_shape(node.inputs[0])
            ns, nd = (int(np.prod(node.inputs[i].shape)) for i in (2, 3))
            if x is not None:
                overhead += 2 * x[0] * ns * nd * x[2]
    total_after = flops_after + overhead
    return {
        "blocks_found": res.stats.get("blocks_found", 0),
        "blocks_merged": res.stats.get("blocks_merged", 0),
        "tokens_removed": res.stats.get("tokens_removed", 0),
        "gflops_before": flops_before / 1e9,
        "gflops_after": total_after / 1e9,
        "gflops_removed": (flops_before - total_after) / 1e9,
        "merge_overhead_gflops": overhead / 1e9,
        "expected_speedup": flops_before / total_after if total_after else 1.0,
    }
