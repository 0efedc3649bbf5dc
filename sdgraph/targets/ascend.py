"""Ascend NPUs through CANN's `atc`: canonical ops to Ascend's FlashAttention and ToMe plugin ops, static shapes, the atc command."""

from __future__ import annotations

import logging
import math
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any, ClassVar, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from sdgraph.errors import PassError, TargetUnavailable, UnsupportedError
from sdgraph.ir.build import GraphBuilder
from sdgraph.ir.canonical import inline_functions
from sdgraph.ir.model import CANONICAL_DOMAIN, Model
from sdgraph.ir.shapes import infer_shapes, static_shape
from sdgraph.passes.base import Option
from sdgraph.targets.base import Capability, LowerContext, Problem, Target, register_target

__all__ = [
    "AscendTarget",
    "Ascend310P",
    "Ascend910B",
    "ATC_ONNX_OPS",
    "VENDOR_OPS",
    "prepare",
    "rewrite_vendor_ops",
    "atc_command",
    "ATC_PRECISION_MODE",
    "batch1_variant",
    "apply_static_shapes",
    "resolve_castlike",
]

log = logging.getLogger(__name__)

# Standard ONNX ops CANN 7's ONNX parser maps (opsets 8-18), from the "ATC ONNX operator" list.
# GroupNormalization is absent on purpose: GroupNorm reaches atc as its standard-op body.
ATC_ONNX_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization BitShift Cast Ceil
Celu Clip Compress Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor GRU Gather GatherElements
GatherND Gemm GlobalAveragePool GlobalMaxPool Greater GreaterOrEqual HardSigmoid HardSwish Hardmax Identity If
InstanceNormalization IsInf IsNaN LRN LSTM LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax
LpNormalization MatMul MatMulInteger Max MaxPool MaxUnpool Mean MeanVarianceNormalization Min Mod Mul Neg
NonMaxSuppression NonZero Not OneHot Or PRelu Pad Pow QLinearConv QLinearMatMul QuantizeLinear RNN
RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RoiAlign Round ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice
Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose
Trilu Unsqueeze Upsample Where Xor
""".split())
ATC_MAX_OPSET = 18  # the plugin ops register ai.onnx::8..18 (MindIE flash_attention_tik_plugin.cc)

# Vendor ops per soc, as the inference-engine (AIE/MindIE) plugin headers register them (op_proto.h):
#   FlashAttentionTik(q, k, v) -> y            fp16 [B, H, S, D]; q pre-scaled; D in HEAD_DIMS_TIK
#   UnpadFlashAttentionMix(Q, Kcache, Vcache[, AttentionMask]) -> (outputO, outputS, outputP, oTmp)
#                                              [B, S, H, D]; scale 1/sqrt(D) inside; output cast to fp32
#   FindMax(x) -> (values, indices)            max and argmax over the last axis
#   TomeMerged(TokenA, TokenB, TOPK_Indice, Arg_Max; topRRate) -> (unmergeTokenA, unReduceTokenB, unReduceCount)
#   TomeUnmerged(attenOut, Ori_IndiceA, Ori_IndiceB, TOPK_Indice, Arg_Max; topRRate) -> unZipToken
# modify_onnx.py inserts the unmerge op as "TomeUnmerge" while op_proto.h registers "TomeUnmerged": we
# emit the registered name, TomeUnmerged (atc resolves plugin ops by their registered type).
VENDOR_OPS = {
    "Ascend310P3": frozenset({"FlashAttentionTik", "FindMax", "TomeMerged", "TomeUnmerged"}),
    "Ascend910B": frozenset({"UnpadFlashAttentionMix"}),  # the seed: ToMe plugins run on 300I Duo/Pro only
}
HEAD_DIMS_TIK = (40, 48, 64, 72, 80, 128, 160, 512)  # flash_attention_tik.cpp HEAD_DIM_LIST

_TIMESTEP_NAMES = ("timestep", "t", "timesteps")
_F32, _F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


# -- canonical op helpers -----------------------------------------------------------------------
def _attr(node: gs.Node, name: str, default=None):
    return node.attrs.get(name, default)


def _const(name: str, value) -> gs.Constant:
    return gs.Constant(name, np.asarray(value))


class _Emitter:
    """Appends nodes under one prefix (``<prefix>/<op>_<n>``) through the graph's builder."""

    def __init__(self, graph: gs.Graph, prefix: str):
        self.graph, self.prefix, self.n = graph, prefix, 0
        self.b = GraphBuilder(graph)

    def __call__(self, op: str, inputs, attrs=None, outputs: int | list = 1, dtype=None, shape=None, name: str | None = None):
        self.n += 1
        base = f"{self.prefix}/{name or op}_{self.n}"
        if isinstance(outputs, int):
            outputs = [f"{base}_out{i}" for i in range(outputs)]
        node = self.b.node(op, inputs, outputs, name=base, attrs=attrs, dtype=dtype)
        for o in node.outputs:
            if shape is not None and o.shape is None:
                o.shape = shape
        return node.outputs[0] if len(node.outputs) == 1 else node.outputs

    def node(self, op: str, name: str, attrs: dict, inputs: list, outputs: list) -> gs.Node:
        return self.b.node(op, inputs, outputs, name=name, attrs=attrs)

    def const(self, tag: str, value):
        self.n += 1
        return _const(f"{self.prefix}/{tag}_{self.n}", value)


def resolve_castlike(model: Model) -> int:
    """CastLike (opset 15, in canonical bodies; not in atc's list) -> Cast to the known dtype, or a constant."""
    infer_shapes(model)
    count = 0
    for node in [n for n in model.graph.nodes if n.op == "CastLike"]:
        x, like = node.inputs[0], node.inputs[1]
        if like.dtype is None:
            continue
        dt = np.dtype(like.dtype)
        if isinstance(x, gs.Constant):
            out = node.outputs[0]
            node.outputs.clear()
            node.inputs.clear()
            out.to_constant(np.asarray(x.values).astype(dt))
        else:
            node.op, node.attrs = "Cast", {"to": onnx.helper.np_dtype_to_tensor_dtype(dt)}
            node.inputs.pop()
        count += 1
    return count


def _replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for i, x in enumerate(list(node.inputs)):
        if x is old:
            node.inputs[i] = new


def _unique_node_names(graph: gs.Graph) -> None:
    """atc and ONNX Runtime both need unique node names (function bodies may carry none)."""
    seen: dict[str, int] = {}
    for node in graph.nodes:
        base = node.name or node.op
        if base in seen:
            seen[base] += 1
            node.name = f"{base}{node.op}_{seen[base]}"
        else:
            seen[base] = 0
            node.name = base


def _detach(node: gs.Node) -> list[gs.Variable]:
    outs = list(node.outputs)
    node.inputs.clear()
    node.outputs.clear()
    return outs


# -- prepare: static shapes, int32 timestep, canonical ops that stay standard -------------------
def apply_static_shapes(model: Model, ctx: LowerContext) -> None:
    """Fix the graph inputs to the (single) declared bucket and propagate shapes."""
    bucket = ctx.shapes[0] if ctx.shapes else {}
    for t in model.graph.inputs:
        if t.name in bucket:
            t.shape = list(bucket[t.name])
    infer_shapes(model)


def timestep_to_int32(model: Model) -> str | None:
    """The UNet's timestep input becomes int32, as the Ascend seed feeds it (Cast back inside)."""
    for t in model.graph.inputs:
        if t.name.lower() in _TIMESTEP_NAMES and t.dtype is not None and np.dtype(t.dtype) != np.int32:
            old = np.dtype(t.dtype)
            inner = gs.Variable(f"{t.name}/as_{old.name}", dtype=old, shape=t.shape)
            for node in [n for n in model.graph.nodes if t in n.inputs]:
                _replace_input(node, t, inner)
            for i, o in enumerate(model.graph.outputs):
                if o is t:  # pragma: no cover - an identity graph
                    model.graph.outputs[i] = inner
            to = onnx.helper.np_dtype_to_tensor_dtype(old)
            GraphBuilder(model.graph).node("Cast", [t], [inner], name=f"{t.name}/Cast_int32_to_{old.name}", attrs={"to": to})
            t.dtype = np.dtype(np.int32)
            return t.name
    return None


def prepare(model: Model, ctx: LowerContext) -> dict[str, Any]:
    """Stage 1 of legalization, still a standard ONNX graph that runs in ONNX Runtime."""
    apply_static_shapes(model, ctx)
    ts = timestep_to_int32(model) if model.role in ("unet", "controlnet") or any(
        t.name.lower() in _TIMESTEP_NAMES for t in model.graph.inputs) else None
    model.graph.cleanup().toposort()
    return {"timestep_int32": ts}


def batch1_variant(model: Model, ctx: LowerContext) -> tuple[Model | None, dict[str, Any]]:
    """``model`` (changed in place) at half its batch, still standard ONNX, and what was done or why not.

    The graph is prepared at its declared (CFG) batch, then the batch axis is followed from every
    input that leads with it through the whole graph (``sdgraph.ir.axes.AxisPlan``): each Reshape
    on its path gets an explicit target and each Expand/Resize its shape at the half batch, so
    no constant folded at the full batch survives. The result is run in ONNX Runtime against the
    first half of the full-batch graph's outputs; a variant that does not match is not returned.
    """
    from sdgraph.ir import runtime as rt
    from sdgraph.ir.axes import AxisPlan

    prepare(model, ctx)
    sample = next((t for t in model.graph.inputs if t.shape is not None and len(t.shape) == 4), model.graph.inputs[0])
    full = static_shape(sample)[0] if sample is not None and static_shape(sample) else None
    if full is None or full % 2:
        return None, {"reason": f"the latent input's batch is {full if full is not None else 'unknown'}, not even"}
    half = full // 2
    batched = [t for t in model.graph.inputs if t.shape and t.shape[0] == full]
    reference = model.copy()
    plan = AxisPlan(full, half, leading_expand=True)
    for t in batched:
        plan.start(t, 0)
    why = plan.build(model.graph.toposort().nodes)
    if why is None and any(plan.axes_of(o) != {0: (1, 1)} for o in model.graph.outputs):
        why = "an output does not lead with the batch"
    if why:
        return None, {"reason": f"cannot halve the batch: {why}"}
    rewritten = plan.apply("bs1")
    for t in model.graph.tensors().values():
        if isinstance(t, gs.Variable) and t not in model.graph.inputs:
            t.shape = None
    for t in batched:
        t.shape = [half] + list(t.shape[1:])
    infer_shapes(model)
    info: dict[str, Any] = {"batch": [full, half], "inputs": [t.name for t in batched], "shape_inputs_rewritten": rewritten}
    try:
        feeds = rt.seeded_inputs(reference, 0)
        want = rt.run(reference, feeds)
    except Exception as exc:  # the check needs the full-batch graph to run here; say so instead
        info["check"] = f"skipped: the batch-{full} graph does not run in ONNX Runtime ({str(exc).splitlines()[0]})"
        return model, info
    names = {t.name for t in batched}
    try:
        got = rt.run(model, {k: v[:half] if k in names else v for k, v in feeds.items()})
    except Exception as exc:
        return None, {**info, "reason": f"the batch-{half} graph does not run in ONNX Runtime: {str(exc).splitlines()[0]}"}
    worst = max(float(np.abs(got[k] - want[k][:half]).max() / max(1.0, float(np.abs(want[k]).max()))) for k in want)
    info["check"] = f"onnxruntime: batch-{half} outputs = first half of batch {full}, max rel {worst:.1e}"
    if not worst <= 1e-3:
        return None, {**info, "reason": f"the batch-{half} graph differs from the first half of batch {full} (max rel {worst:.2g})"}
    return model, info


# -- vendor ops ---------------------------------------------------------------------------------
def _attention_dims(node: gs.Node) -> tuple[int, int, int, int, int] | str:
    """(B, H, Sq, Sk, D) of a canonical Attention over [B, H, S, D] tensors (sdgraph.ir.canonical), or why not."""
    q, k = node.inputs[0], node.inputs[1]
    qs, ks = static_shape(q), static_shape(k)
    if qs is None or ks is None:
        return "q/k shapes are not static after shape inference"
    if len(qs) != 4 or len(ks) != 4:
        return f"q/k have rank {len(qs)}/{len(ks)}, expected [B, H, S, D]"
    return qs[0], qs[1], qs[2], ks[2], qs[3]


def _scale(node: gs.Node, d: int) -> float:
    s = _attr(node, "scale", None)
    return float(s) if s not in (None, 0, 0.0) else 1.0 / math.sqrt(d)


def fa_reason(node: gs.Node, soc: str) -> str | None:
    """Why this canonical Attention cannot become the soc's FlashAttention op (None: it can)."""
    dims = _attention_dims(node)
    if isinstance(dims, str):
        return dims
    b, h, sq, sk, d = dims
    if len(node.inputs) > 3 and node.inputs[3] is not None and node.inputs[3].name:
        return "has an attention mask (the FlashAttention plugins take none)"
    if _attr(node, "causal", 0):
        return "is causal (the FlashAttention plugins take no mask)"
    if soc.startswith("Ascend310P"):
        if d not in HEAD_DIMS_TIK:
            return f"head dim {d} not in FlashAttentionTik's {list(HEAD_DIMS_TIK)}"
        if not (1 <= b <= 64 and 1 <= h <= 4096 and 1 <= sq <= 131072 and 1 <= sk <= 131072):
            return f"batch {b} / heads {h} / seq {sq},{sk} outside FlashAttentionTik's ranges"
        return None
    # UnpadFlashAttentionMix kernel limits (unpad_flashattention_mix.cce): seq 1024-4096, heads 5-10, D 40|64, batch 1-2
    if d not in (40, 64):
        return f"head dim {d} not in UnpadFlashAttentionMix's [40, 64]"
    if not (1024 <= sq <= 4096 and 1024 <= sk <= 4096):
        return f"seq {sq},{sk} outside UnpadFlashAttentionMix's 1024..4096 (self-attention at the top level only)"
    if not (5 <= h <= 10 and 1 <= b <= 2):
        return f"batch {b} / heads {h} outside UnpadFlashAttentionMix's batch 1..2, heads 5..10"
    return None


def _rewrite_fa(graph: gs.Graph, node: gs.Node, soc: str) -> None:
    b, h, sq, sk, d = _attention_dims(node)
    q, k, v = node.inputs[:3]
    scale = _scale(node, d)
    e = _Emitter(graph, node.name)
    (out,) = _detach(node)
    if soc.startswith("Ascend310P"):
        # FlashAttentionTik: fp16 [B, H, S, D]; the softmax scale moves onto q (modify_onnx.py "move mul to q")
        qs = e("Mul", [q, e.const("scale", np.array(scale, np.float32))], dtype=np.float32, shape=[b, h, sq, d])
        heads = [e("Cast", [x], {"to": _F16}, dtype=np.float16) for x in (qs, k, v)]
        y = e("FlashAttentionTik", heads, dtype=np.float16, shape=[b, h, sq, d], name="FlashAttentionTik")
        e.node("Cast", f"{node.name}/Cast_out", {"to": _F32}, [y], [out])
        return
    # UnpadFlashAttentionMix: [B, S, H, D], scale 1/sqrt(D) inside: pre-scale q when the graph's differs
    if abs(scale * math.sqrt(d) - 1.0) > 1e-6:
        q = e("Mul", [q, e.const("rescale", np.array(scale * math.sqrt(d), np.float32))], dtype=np.float32)
    bshd = [e("Transpose", [x], {"perm": [0, 2, 1, 3]}, dtype=np.float32, shape=[b, s, h, d])
            for x, s in ((q, sq), (k, sk), (v, sk))]
    y = e("UnpadFlashAttentionMix", bshd, outputs=4, name="UnpadFlashAttentionMix")[0]
    y.shape = [b, sq, h, d]
    y = e("Cast", [y], {"to": _F32}, dtype=np.float32, shape=[b, sq, h, d])
    e.node("Transpose", f"{node.name}/Transpose_out", {"perm": [0, 2, 1, 3]}, [y], [out])


def _tome_reason(node: gs.Node) -> str | None:
    """Why a canonical TomeMerge cannot take the plugin path (None: it can)."""
    if len(node.inputs) < 4 or len(node.outputs) < 3:
        return f"expects TomeMerge(x, metric, src_idx, dst_idx) -> (merged, order, node_idx), got {len(node.inputs)} inputs/{len(node.outputs)} outputs"
    if static_shape(node.inputs[2]) is None:
        return "src_idx has no static length"
    xs = static_shape(node.inputs[0])
    if xs is None or len(xs) != 3:
        return "tokens are not a static [B, N, C] tensor"
    if not int(_attr(node, "r", 0) or 0):
        return "no merge count attribute r"
    return None


def _rewrite_tome(graph: gs.Graph, merge: gs.Node, unmerges: list[gs.Node], opset: int) -> None:
    """TomeMerge(x, metric, src_idx, dst_idx; r) -> similarity in standard ops + FindMax + TopK + TomeMerged
    (+ the mean of the destinations); TomeUnmerge(y, src_idx, dst_idx, order, node_idx) -> TomeUnmerged."""
    x, metric, idx_a, idx_b = merge.inputs[:4]
    bsz = static_shape(x)[0]
    na = static_shape(idx_a)[0]
    r = int(_attr(merge, "r"))
    rate = float(r) / float(na)  # topRRate = r / Ns (sdgraph/ir/canonical_tome.py)
    e = _Emitter(graph, merge.name)
    merged, src_idx, dst_idx = _detach(merge)[:3]

    def reduce_sum(t, axis, keep):
        if opset >= 13:
            return e("ReduceSum", [t, e.const("axes", np.array([axis], np.int64))], {"keepdims": keep}, dtype=np.float32)
        return e("ReduceSum", [t], {"axes": [axis], "keepdims": keep}, dtype=np.float32)

    mn = e("LpNormalization", [metric], {"axis": -1, "p": 2}, dtype=np.float32)
    a = e("Gather", [mn, idx_a], {"axis": 1}, dtype=np.float32)
    bb = e("Gather", [mn, idx_b], {"axis": 1}, dtype=np.float32)
    scores = e("MatMul", [a, e("Transpose", [bb], {"perm": [0, 2, 1]}, dtype=np.float32)], dtype=np.float32)
    node_max, node_idx = e("FindMax", [scores], outputs=2, name="FindMax")
    k = e.const("k", np.array([na], np.int64))
    _, edge_idx = e("TopK", [node_max, k], {"axis": -1, "largest": 1}, outputs=2)
    tok_a = e("Cast", [e("Gather", [x, idx_a], {"axis": 1}, dtype=np.float32)], {"to": _F32}, dtype=np.float32)
    tok_b = e("Cast", [e("Gather", [x, idx_b], {"axis": 1}, dtype=np.float32)], {"to": _F32}, dtype=np.float32)
    unm, sum_b, cnt = e("TomeMerged", [tok_a, tok_b, edge_idx, node_idx], {"topRRate": rate}, outputs=3, name="TomeMerged")
    cnt_b = e("Unsqueeze", [reduce_sum(cnt, 1, 0), e.const("axes2", np.array([2], np.int64))], dtype=np.float32) if opset >= 13 \
        else e("Unsqueeze", [reduce_sum(cnt, 1, 0)], {"axes": [2]}, dtype=np.float32)
    mean_b = e("Div", [reduce_sum(sum_b, 1, 0), cnt_b], dtype=np.float32)
    e.node("Concat", f"{merge.name}/Concat_merged", {"axis": 1}, [unm, mean_b], [merged])
    # the canonical op's own index outputs are replaced by the plugin's (TopK order and FindMax argmax)
    for idx_out, plugin in ((src_idx, edge_idx), (dst_idx, node_idx)):
        for consumer in list(idx_out.outputs):
            _replace_input(consumer, idx_out, plugin)
    for un in unmerges:
        y = un.inputs[0]
        (out,) = _detach(un)
        eu = _Emitter(graph, un.name)
        reps = eu.const("reps", np.array([1, bsz], np.int64))
        ori = [eu("Tile", [eu("Unsqueeze", [ix, eu.const("axes0", np.array([0], np.int64))]) if opset >= 13
                          else eu("Unsqueeze", [ix], {"axes": [0]}), reps]) for ix in (idx_a, idx_b)]
        eu.node("TomeUnmerged", f"{un.name}/TomeUnmerged", {"topRRate": rate}, [y, ori[0], ori[1], edge_idx, node_idx], [out])


def rewrite_vendor_ops(model: Model, soc: str, fa: bool = True, tome: bool = True) -> dict[str, Any]:
    """Stage 2: canonical Attention/ToMe to the soc's plugin ops where the kernels take them; the rest inline."""
    stats: dict[str, Any] = {"flash_attention": 0, "attention_inlined": 0, "tome_plugin": 0, "tome_inlined": 0, "kept_standard": []}
    infer_shapes(model)
    vendor = VENDOR_OPS["Ascend310P3" if soc.startswith("Ascend310P") else "Ascend910B"]
    fa_op = "FlashAttentionTik" if "FlashAttentionTik" in vendor else "UnpadFlashAttentionMix"
    for node in [n for n in model.graph.nodes if n.domain == CANONICAL_DOMAIN and n.op == "Attention"]:
        why = "disabled (fa=false)" if not fa else fa_reason(node, soc)
        if why is None:
            _rewrite_fa(model.graph, node, soc)
            stats["flash_attention"] += 1
        else:
            stats["kept_standard"].append(f"{node.name}: Attention not {fa_op}: {why}")
    merges = [n for n in model.graph.nodes if n.domain == CANONICAL_DOMAIN and n.op == "TomeMerge"]
    for merge in merges:
        why = "ToMe plugins run on Atlas 300I Duo/Pro (310P) only" if "TomeMerged" not in vendor else (
            "disabled (tome=false)" if not tome else _tome_reason(merge))
        if why is None:
            src_idx, dst_idx = merge.outputs[1], merge.outputs[2]
            unmerges = [n for n in model.graph.nodes if n.domain == CANONICAL_DOMAIN and n.op == "TomeUnmerge"
                        and (src_idx in n.inputs or dst_idx in n.inputs)]
            _rewrite_tome(model.graph, merge, unmerges, model.opset)
            stats["tome_plugin"] += 1
        else:
            stats["kept_standard"].append(f"{merge.name}: TomeMerge not TomeMerged: {why}")
    model.graph.cleanup().toposort()
    counts = model.op_histogram()
    stats["attention_inlined"] = counts.get(f"{CANONICAL_DOMAIN}::Attention", 0)
    stats["tome_inlined"] = counts.get(f"{CANONICAL_DOMAIN}::TomeMerge", 0)
    bodiless = [f"{n.name} ({n.op})" for n in model.graph.nodes
                if n.domain == CANONICAL_DOMAIN and (n.domain, n.op) not in model.functions]
    if bodiless:
        raise UnsupportedError(f"{len(bodiless)} canonical node(s) have no plugin form on {soc} and no body to inline: "
                               f"{', '.join(bodiless[:3])}", stats["kept_standard"] or bodiless)
    stats["inlined"] = inline_functions(model)
    _unique_node_names(model.graph)
    stats["castlike_resolved"] = resolve_castlike(model)
    model.graph.cleanup().toposort()
    allowed = ATC_ONNX_OPS | vendor
    left = sorted({n.op for n in model.graph.nodes if n.op not in allowed or n.domain not in ("", None, "ai.onnx")})
    if left:
        raise UnsupportedError(f"after legalization the graph still has ops atc cannot parse: {', '.join(left)}", left)
    return stats


# -- the atc command ----------------------------------------------------------------------------
def _input_shape_arg(model: Model) -> str:
    return ";".join(f"{t.name}:{','.join(str(int(d)) for d in t.shape)}" for t in model.graph.inputs)


def groupnorm_nodes(model: Model) -> list[str]:
    """Nodes doing GroupNorm's normalization (InstanceNormalization of the exported pattern, or the op)."""
    return [n.name for n in model.graph.nodes if n.op in ("InstanceNormalization", "GroupNormalization")]


def customize_dtypes_text(model: Model) -> str:
    """--customize_dtypes lines keeping every GroupNorm normalization in fp32 (CANN's Opname:: syntax)."""
    lines = []
    for n in model.graph.nodes:
        if n.op in ("InstanceNormalization", "GroupNormalization"):
            k = len([i for i in n.inputs if i is not None and i.name])
            lines.append(f"Opname::{n.name}:InputDtype:{','.join(['float32'] * k)},OutputDtype:float32")
    return "\n".join(lines) + ("\n" if lines else "")


# sdgraph --precision -> atc --precision_mode (CANN's atc parameter reference): force_fp16 runs every op that
# has a float16 kernel in float16 (atc's default for inference); force_fp32 (= cube_fp16in_fp32out) keeps
# vector ops in float32 and gives matrix ops float32 outputs. must_keep_origin_dtype is not used: it fails
# on ops whose AI Core kernel lacks float32.
ATC_PRECISION_MODE = {"fp16": "force_fp16", "fp32": "force_fp32"}


def atc_command(atc: str, model_file: str, output: str, role: str, input_shape: str, soc: str,
                customize_dtypes: str | None = None, precision: str | None = None) -> list[str]:
    """The vendor-documented atc invocation for one submodel (``precision`` adds ``--precision_mode``)."""
    cmd = [atc, "--framework=5", f"--model={model_file}", f"--output={output}",
           f"--input_format={'ND' if role.startswith('text_encoder') else 'NCHW'}",
           f"--input_shape={input_shape}", "--log=error", f"--soc_version={soc}"]
    if precision is not None:
        cmd.append(f"--precision_mode={ATC_PRECISION_MODE[precision]}")
    if role in ("unet", "controlnet"):
        cmd += ["--optypelist_for_implmode=Gelu,Sigmoid", "--op_select_implmode=high_performance"]
    if customize_dtypes:
        cmd.append(f"--customize_dtypes={customize_dtypes}")
    return cmd


def _shell(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) if not c.startswith("--optypelist_for_implmode=") else '--optypelist_for_implmode="Gelu,Sigmoid"'
                    for c in cmd)


def _options(soc_default: str, soc_choices: tuple[str, ...]) -> tuple[Option, ...]:
    return (
        Option("soc", str, soc_default, "--soc_version (npu-smi info names the chip)", choices=soc_choices),
        Option("atc", str, "atc", "the atc executable (run only when found on PATH)"),
        Option("fa", bool, True, "rewrite canonical Attention to the soc's FlashAttention plugin"),
        Option("tome", bool, True, "rewrite canonical ToMe ops to the TomeMerged/TomeUnmerged plugins (310P)"),
        Option("parallel_cfg", bool, True, "also write the batch-1 UNet for two-device parallel CFG"),
        Option("run_atc", bool, True, "run atc when it is on PATH (false: only write convert.sh)"),
    )


# -- the targets --------------------------------------------------------------------------------
class AscendTarget(Target):
    """Ascend NPU through CANN's atc.

    Cases handled:
    1. static shapes: every input fixed by the graph or one ``--shape`` bucket (inputs without are named);
    2. timestep input int32 (Cast back inside), as the ModelZoo seed feeds it;
    3. canonical Attention -> FlashAttentionTik (310P, [B,H,S,D] fp16, q pre-scaled) or
       UnpadFlashAttentionMix (910B, [B,S,H,D], output cast to fp32) where the kernel's limits hold;
    4. canonical TomeMerge/TomeUnmerge -> FindMax + TopK + TomeMerged / TomeUnmerged (310P only);
    5. every other canonical op inlined to its standard-op body;
    6. ``atc`` per submodel (UNet impl-mode flags, VAE GroupNorm kept fp32 by --customize_dtypes):
       run when on PATH, always written to convert.sh;
    7. the UNet's batch-1 variant for two-device parallel CFG (``parallel_cfg``).
    """

    soc_default: ClassVar[str] = ""
    soc_choices: ClassVar[tuple[str, ...]] = ()
    fa_op: ClassVar[str] = ""
    extra = None
    capability = Capability(
        ops=ATC_ONNX_OPS,
        canonical_ops=frozenset({"Attention", "TomeMerge", "TomeUnmerge"}),
        dtypes=frozenset({"float32", "float16", "int64", "int32", "bool"}),
        precisions=("fp16", "fp32"),
        static_shapes=True,
        devices=("npu",),
    )

    def __init__(self):
        self.stats: dict[str, Any] = {}
        self._variant: Model | None = None


    def _soc(self, ctx: LowerContext) -> str:
        return str(ctx.options.get("soc") or self.soc_default)

    def available(self) -> tuple[bool, str]:
        if shutil.which("atc") is None:
            return True, "atc not on PATH: lowering writes convert.sh with the exact commands"
        return True, ""

    def tool_versions(self) -> dict[str, str]:
        atc = shutil.which("atc")
        return {"atc": atc or "absent", "ascend_toolkit": os.environ.get("ASCEND_TOOLKIT_HOME", "")}

    def check(self, model: Model, ctx: LowerContext) -> list[Problem]:
        problems = []
        if model.opset > ATC_MAX_OPSET:
            problems.append(Problem("model", f"opset {model.opset}", f"atc's ONNX parser takes opsets 8..{ATC_MAX_OPSET}",
                                    "export with opset <= 18"))
        if len(ctx.shapes) > 1:
            problems.append(Problem("model", "--shape", f"one .om holds one static shape; got {len(ctx.shapes)} buckets",
                                    "lower once per shape"))
        tome_native = "TomeMerged" in VENDOR_OPS["Ascend310P3" if self._soc(ctx).startswith("Ascend310P") else "Ascend910B"]
        for node in model.graph.nodes:
            if node.domain != CANONICAL_DOMAIN or (node.domain, node.op) in model.functions:
                continue
            if node.op not in self.capability.canonical_ops or (node.op.startswith("Tome") and not tome_native):
                problems.append(Problem(node.name, f"{node.domain}::{node.op}", f"no {self.name} plugin op and no body to inline",
                                        "re-run the pass that made it so the model carries its function"))
        return problems

    def legalize(self, model: Model, ctx: LowerContext) -> None:
        soc = self._soc(ctx)
        variant = None
        if ctx.role == "unet" and ctx.options.get("parallel_cfg", True):
            variant = model.copy()
        self.stats = prepare(model, ctx)
        self.stats.update(rewrite_vendor_ops(model, soc, fa=ctx.options.get("fa", True), tome=ctx.options.get("tome", True)))
        self._variant = None
        if variant is not None:
            self._variant = self._batch1(variant, ctx, soc)
        log.info("ascend %s: %s", soc, {k: v for k, v in self.stats.items() if k != "kept_standard"})

    def _batch1(self, model: Model, ctx: LowerContext, soc: str) -> Model | None:
        """The UNet at half the CFG batch: each of two devices runs one half of the guidance batch."""
        variant, info = batch1_variant(model, ctx)
        self.stats["parallel_cfg"] = "unet_bs1" if variant is not None else f"not written: {info['reason']}"
        self.stats["parallel_cfg_check"] = info
        if variant is None:
            log.warning("%s: batch-1 variant for parallel CFG not written: %s", ctx.submodel, info["reason"])
            return None
        rewrite_vendor_ops(variant, soc, fa=ctx.options.get("fa", True), tome=ctx.options.get("tome", True))
        return variant

    def build(self, model: Model, out_dir: Path, ctx: LowerContext) -> dict[str, Any]:
        soc = self._soc(ctx)
        atc = str(ctx.options.get("atc") or "atc")
        out_dir = Path(out_dir)
        jobs = [("model", model)]
        if getattr(self, "_variant", None) is not None:
            jobs.append(("model_bs1", self._variant))
        commands, entries = [], {}
        for stem, m in jobs:
            m.save_to_dir_unchecked(out_dir, f"{stem}.onnx")
            cdt = None
            if ctx.role.startswith("vae") and ctx.precision == "fp16":  # GroupNorm stays fp32 under force_fp16
                text = customize_dtypes_text(m)
                if text:
                    cdt = f"{stem}.customize_dtypes.cfg"
                    (out_dir / cdt).write_text(text)
            cmd = atc_command(atc, f"{stem}.onnx", stem, ctx.role, _input_shape_arg(m), soc, cdt, ctx.precision)
            commands.append(cmd)
            entries[stem] = {"onnx": f"{stem}.onnx", "om": f"{stem}.om", "atc": _shell(cmd),
                             "input_shape": _input_shape_arg(m)}
        script = out_dir / "convert.sh"
        script.write_text("#!/usr/bin/env bash\n# atc commands for this submodel (CANN toolkit: source set_env.sh first)\n"
                          "set -euo pipefail\ncd \"$(dirname \"$0\")\"\n" + "".join(_shell(c) + "\n" for c in commands))
        script.chmod(0o755)
        ran = []
        exe = shutil.which(atc) if ctx.options.get("run_atc", True) else None
        if exe is None:
            log.warning("%s: atc not found on PATH; wrote %s/convert.sh with the exact commands", ctx.submodel, ctx.submodel)
        for cmd in commands if exe else []:
            proc = subprocess.run([exe, *cmd[1:]], cwd=out_dir, capture_output=True, text=True)
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
            ran.append({"returncode": proc.returncode, "tail": tail})
            if proc.returncode != 0:
                raise PassError(f"{ctx.submodel}: atc exited {proc.returncode}: {' | '.join(tail) or 'no output'}")
        return {
            "format": "om" if ran else "onnx+convert.sh",
            "soc_version": soc,
            "precision_mode": ATC_PRECISION_MODE[ctx.precision],
            "converted": bool(ran),
            "atc_ran": ran,
            "models": entries,
            "legalize": {k: v for k, v in self.stats.items()},
            "dynamic": False,
        }

    def refit(self, sub_dir: Path, entry: Mapping[str, Any], changes, ctx: LowerContext) -> dict[str, Any]:
        """The changed tensors' bytes in each variant's ONNX, then a new ``.om`` per variant through the
        recorded atc command (logged; with no atc here the stale ``.om`` files go and convert.sh stays right)."""
        from sdgraph.ir.io import rewrite_initializers

        models = dict(entry.get("models", {}))
        for stem, m in models.items():
            missed = rewrite_initializers(sub_dir / m["onnx"], {k: v[1] for k, v in changes.items()})
            if len(missed) == len(changes):
                raise UnsupportedError(f"{sub_dir}: the {stem} graph holds none of the LoRA'd weights under their names "
                                       "(renamed while legalizing): lower the LoRA-fused model instead")
        exe = shutil.which(shlex.split(next(iter(models.values()))["atc"])[0]) if models and ctx.options.get("run_atc", True) else None
        ran = []
        for m in models.values():
            (sub_dir / m["om"]).unlink(missing_ok=True)  # built from the old weights
            if exe is None:
                continue
            cmd = shlex.split(m["atc"])
            log.info("%s: %s", ctx.submodel, m["atc"])
            proc = subprocess.run([exe, *cmd[1:]], cwd=sub_dir, capture_output=True, text=True)
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
            ran.append({"returncode": proc.returncode, "tail": tail, "command": m["atc"]})
            if proc.returncode != 0:
                raise PassError(f"{ctx.submodel}: atc exited {proc.returncode}: {' | '.join(tail) or 'no output'}")
        if exe is None:
            log.warning("%s: atc not found on PATH; run %s/convert.sh for the new .om files", ctx.submodel, sub_dir.name)
        return {"atc_ran": ran, "converted": bool(ran), "format": "om" if ran else "onnx+convert.sh",
                "refit": {"tensors": len(changes), "atc": [m["atc"] for m in models.values()]}}

    def load(self, artifact_dir: Path, entry: Mapping[str, Any], ctx: LowerContext):
        om = Path(artifact_dir) / entry.get("models", {}).get("model", {}).get("om", "model.om")
        if not om.is_file():
            raise TargetUnavailable(f"{om}: no .om file; run {Path(artifact_dir) / 'convert.sh'} on a machine with CANN's atc")
        try:
            from ais_bench.infer.interface import InferSession  # Ascend's inference tool (AIT benchmark)
        except ImportError:
            raise TargetUnavailable("running .om models needs an Ascend NPU and ais_bench (AIT benchmark)") from None
        session = InferSession(int(ctx.options.get("device", 0)), str(om))
        names_in = [i.name for i in session.get_inputs()]
        names_out = [o.name for o in session.get_outputs()]

        class _Runner:
            input_names, output_names = names_in, names_out

            def __call__(self, feeds):
                outs = session.infer([np.ascontiguousarray(feeds[n]) for n in names_in])
                return dict(zip(names_out, outs))

        return _Runner()


@register_target
class Ascend310P(AscendTarget):
    """Atlas 300I Duo/Pro (Ascend 310P3): FlashAttentionTik and the ToMe plugins."""

    name = "ascend310p"
    summary = "Ascend 310P (Atlas 300I Duo) via CANN atc: FlashAttentionTik, TomeMerged/TomeUnmerged plugins"
    soc_default = "Ascend310P3"
    soc_choices = ("Ascend310P1", "Ascend310P3")
    fa_op = "FlashAttentionTik"
    options = _options(soc_default, soc_choices)


@register_target
class Ascend910B(AscendTarget):
    """Atlas 800I A2 (Ascend 910B): UnpadFlashAttentionMix on the top-level self-attention."""

    name = "ascend910b"
    summary = "Ascend 910B (Atlas A2) via CANN atc: UnpadFlashAttentionMix"
    soc_default = "Ascend910B4"
    soc_choices = ("Ascend910B1", "Ascend910B2", "Ascend910B3", "Ascend910B4")
    fa_op = "UnpadFlashAttentionMix"
    options = _options(soc_default, soc_choices)
