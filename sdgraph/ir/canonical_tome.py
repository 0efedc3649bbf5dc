"""Canonical ToMe ops: ai.sdgraph TomeMerge / TomeUnmerge as ONNX functions over standard ops.

Interface (names chosen so a target maps them one to one onto Ascend's ``TomeMerged`` /
``TomeUnmerged`` plugin ops, which take the same index tensors):

``TomeMerge<r>(x, metric, src_idx, dst_idx) -> (merged, order, node_idx)``
    x [B, N, C]: the tokens to merge (the LayerNorm output in front of an attention/MLP);
    metric [B, N, C]: what similarity is measured on (the transformer block's input, as tomesd);
    src_idx [Ns] / dst_idx [Nd] int64: token positions of sources and destinations (one
    destination per sx*sy cell), Ns + Nd = N, constants chosen at pass time;
    r (attribute): how many sources are merged (tomesd: ``int(ratio * N)``, at most Ns).
    merged [B, N-r, C] = [unmerged sources (best-score order) | destinations averaged with the
    sources merged into them]; order [B, Ns] int64: sources sorted by best similarity,
    descending (Ascend ``TOPK_Indice``); node_idx [B, Ns] int64: each source's most similar
    destination (Ascend ``Arg_Max``). Ascend ``topRRate`` = r / Ns.

``TomeMergeShared<r>(x, src_idx, dst_idx, order, node_idx) -> merged``
    TomeMerge with the matching given: ``order`` / ``node_idx`` are the outputs of the block's
    TomeMerge, so the sub-layers of one transformer block (attn1, attn2, ff) share one
    similarity, as tomesd's ``compute_merge`` once per block. On Ascend the shared indices are
    the TomeMerged plugin's own.

``TomeUnmerge<r>(y, src_idx, dst_idx, order, node_idx) -> out``
    y [B, N-r, C] in ``merged`` layout; out [B, N, C]: destinations and unmerged sources back at
    their positions, each merged source a copy of its destination's value.

Both bodies need opset >= 16 (ScatterElements with reduction); ``make_tome_functions(opset)``
builds them for the model's opset.
"""

from __future__ import annotations

import onnx
import onnx.parser

from sdgraph.ir.model import CANONICAL_DOMAIN

__all__ = ["TOME_MERGE", "TOME_MERGE_SHARED", "TOME_UNMERGE", "MIN_OPSET", "make_tome_functions",
           "make_tome_shared_function"]

TOME_MERGE = "TomeMerge"
TOME_MERGE_SHARED = "TomeMergeShared"
TOME_UNMERGE = "TomeUnmerge"
MIN_OPSET = 16

_COMMON = """
  zero1 = Constant <value_ints = [0]> ()
  one1 = Constant <value_ints = [1]> ()
  m1 = Constant <value_ints = [-1]> ()
  big1 = Constant <value_ints = [9223372036854775807]> ()
  ax1 = Constant <value_ints = [1]> ()
  rs = Constant <value_int: int = @r> ()
  r1 = Unsqueeze (rs, zero1)
  src_sel = Slice (order, zero1, r1, ax1)
  tgt = GatherElements <axis = 1> (node_idx, src_sel)
  tgt3 = Unsqueeze (tgt, m1)
"""

# The merge given the matching (order, node_idx): shared by TomeMerge and TomeMergeShared.
_MERGE_BODY = """
  unm_sel = Slice (order, r1, big1, ax1)
  src = Gather <axis = 1> (x, src_idx)
  dst = Gather <axis = 1> (x, dst_idx)
  unm3 = Unsqueeze (unm_sel, m1)
  unm = GatherND <batch_dims = 1> (src, unm3)
  sel3 = Unsqueeze (src_sel, m1)
  msrc = GatherND <batch_dims = 1> (src, sel3)
  msrc_shape = Shape (msrc)
  idx3 = Expand (tgt3, msrc_shape)
  dsum = ScatterElements <axis = 1, reduction = "add"> (dst, idx3, msrc)
  onef = Constant <value_float = 1.0> ()
  one = CastLike (onef, x)
  tgt3_shape = Shape (tgt3)
  ones_r = Expand (one, tgt3_shape)
  dshape = Shape <end = 2> (dst)
  cshape = Concat <axis = 0> (dshape, one1)
  ones_d = Expand (one, cshape)
  cnt = ScatterElements <axis = 1, reduction = "add"> (ones_d, tgt3, ones_r)
  dmean = Div (dsum, cnt)
  merged = Concat <axis = 1> (unm, dmean)
"""

_MERGE = """
<domain: "{domain}", opset_import: ["" : {opset}]>
TomeMerge <r> (x, metric, src_idx, dst_idx) => (merged, order, node_idx) {{
  mn = LpNormalization <axis = -1, p = 2> (metric)
  a = Gather <axis = 1> (mn, src_idx)
  b = Gather <axis = 1> (mn, dst_idx)
  bt = Transpose <perm = [0, 2, 1]> (b)
  scores = MatMul (a, bt)
  k1 = Constant <value_ints = [1]> ()
  best_v, best_i = TopK <axis = -1, largest = 1, sorted = 1> (scores, k1)
  mm1 = Constant <value_ints = [-1]> ()
  node_max = Squeeze (best_v, mm1)
  node_idx = Squeeze (best_i, mm1)
  ns = Shape (src_idx)
  sorted_v, order = TopK <axis = -1, largest = 1, sorted = 1> (node_max, ns)
{common}{body}}}
"""

_MERGE_SHARED = """
<domain: "{domain}", opset_import: ["" : {opset}]>
TomeMergeShared <r> (x, src_idx, dst_idx, order, node_idx) => (merged) {{
{common}{body}}}
"""

_UNMERGE = """
<domain: "{domain}", opset_import: ["" : {opset}]>
TomeUnmerge <r> (y, src_idx, dst_idx, order, node_idx) => (out) {{
{common}
  nd = Shape (dst_idx)
  negnd = Neg (nd)
  unm = Slice (y, zero1, negnd, ax1)
  dsty = Slice (y, negnd, big1, ax1)
  srcv = GatherND <batch_dims = 1> (dsty, tgt3)
  vals = Concat <axis = 1> (srcv, unm)
  zs = Constant <value_int = 0> ()
  os = Constant <value_int = 1> ()
  ns1 = Shape (src_idx)
  ns = Squeeze (ns1, zero1)
  ar = Range (zs, ns, os)
  order_shape = Shape (order)
  arb = Expand (ar, order_shape)
  inv = ScatterElements <axis = 1> (arb, order, arb)
  inv3 = Unsqueeze (inv, m1)
  srcfull = GatherND <batch_dims = 1> (vals, inv3)
  full = Concat <axis = 1> (srcfull, dsty)
  cat = Concat <axis = 0> (src_idx, dst_idx)
  nn1 = Shape (cat)
  nn = Squeeze (nn1, zero1)
  arn = Range (zs, nn, os)
  invp = ScatterElements <axis = 0> (arn, cat, arn)
  out = Gather <axis = 1> (full, invp)
}}
"""


def make_tome_functions(opset: int) -> tuple[onnx.FunctionProto, onnx.FunctionProto]:
    """(TomeMerge, TomeUnmerge) function protos importing the default domain at ``opset``."""
    if opset < MIN_OPSET:
        raise ValueError(f"TomeMerge/TomeUnmerge need opset >= {MIN_OPSET}")
    fmt = dict(domain=CANONICAL_DOMAIN, opset=opset, common=_COMMON, body=_MERGE_BODY)
    merge = onnx.parser.parse_function(_MERGE.format(**fmt))
    unmerge = onnx.parser.parse_function(_UNMERGE.format(**fmt))
    return merge, unmerge


def make_tome_shared_function(opset: int) -> onnx.FunctionProto:
    """The TomeMergeShared function proto (the merge of TomeMerge, given its order/node_idx)."""
    if opset < MIN_OPSET:
        raise ValueError(f"TomeMergeShared needs opset >= {MIN_OPSET}")
    return onnx.parser.parse_function(_MERGE_SHARED.format(domain=CANONICAL_DOMAIN, opset=opset, common=_COMMON, body=_MERGE_BODY))
