"""deepcache: DeepCache (Ma, Fang & Wang, CVPR 2024) as two UNet graphs and a per-step schedule.

The UNet's up path re-enters each skip branch through a Concat of (deep hidden state, down-path
output). DeepCache computes the deep part only every N-th step and reuses the hidden state that
enters skip branch B in between. This pass writes that as graphs:

- the UNet itself gains one output, ``deepcache_feature``: the hidden state entering the Concat
  of branch B (the graph's other outputs are unchanged: an exact pass);
- a variant ``unet_shallow`` (``PassResult.variants``) reads that tensor as an input: it keeps
  conv_in, the down path up to the output of branch B, the up path from that Concat on and
  conv_out; everything deeper is dead and removed;
- the schedule (``sdgraph.schedule``): the full graph at the cache steps (``interval`` N,
  ``uniform`` every N-th step or DeepCache's ``quadratic`` spacing), the shallow one between.

Cases handled:
  1. The branches are found structurally: a Concat on axis 1 of two tensors that both descend
     from the ``sample`` input (not through Shape), where one input's producer is an ancestor of
     the other's (the down-path output vs the deep hidden state). Branch 0 is the skip produced
     first (conv_in's output), as in DeepCache's ``cache_branch_id``; both exporters, SD1.x/2.x,
     SDXL and 8-channel InstructPix2Pix UNets alike.
  2. The cached feature's channels and its downscale against ``sample`` come from shape
     inference on a copy with every symbolic input dim fixed (batch 1, latents 64x64, text 77),
     so a dynamic export works too; its input dims in the shallow graph follow ``sample``'s
     (``NAME/2`` for a symbolic spatial dim at half resolution).
"""

from __future__ import annotations

import dataclasses

import networkx as nx
import numpy as np
import onnx_graphsurgeon as gs

from sdgraph.errors import PassError
from sdgraph.ir.edit import remove_dead, replace_all_uses
from sdgraph.ir.shapes import infer_shapes
from sdgraph.ir.topology import dataflow
from sdgraph.passes.base import Option, Pass, PassResult, Variant, register
from sdgraph.schedule import SPACINGS, deepcache_schedule

__all__ = ["DeepCache", "Branch", "find_branches", "FEATURE", "SHALLOW"]

FEATURE = "deepcache_feature"  # the full graph's extra output = the shallow graph's extra input
SHALLOW = "shallow"  # the variant's suffix: unet -> unet_shallow
_SHAPE_OPS = {"Shape", "Size"}
_PROBE = 64  # latent size of the shape probe (64 = 2**6: room for six downsamplings)


@dataclasses.dataclass
class Branch:
    """One skip branch: the up-path Concat joining ``hidden`` (deep) and ``skip`` (down path)."""

    index: int
    concat: gs.Node
    hidden: gs.Tensor
    skip: gs.Tensor


def _sample_input(graph: gs.Graph) -> gs.Tensor | None:
    named = [t for t in graph.inputs if t.name == "sample"]
    return named[0] if named else next((t for t in graph.inputs if t.shape is not None and len(t.shape) == 4), None)


def find_branches(graph: gs.Graph) -> list[Branch]:
    """The skip branches of a UNet graph, shallowest (conv_in's skip) first; [] when none are found."""
    sample = _sample_input(graph)
    if sample is None:
        return []
    reach, stack = {id(sample)}, [sample]
    while stack:  # tensors computed from the sample's values (Shape/Size only read its dims)
        for node in stack.pop().outputs:
            if node.op in _SHAPE_OPS:
                continue
            for out in node.outputs:
                if id(out) not in reach:
                    reach.add(id(out))
                    stack.append(out)
    index = {id(n): i for i, n in enumerate(graph.nodes)}
    flow = dataflow(graph)
    found = []
    for node in graph.nodes:
        if node.op != "Concat" or len(node.inputs) != 2 or int(node.attrs.get("axis", 0)) not in (1, -3):
            continue
        a, b = node.inputs
        if not (id(a) in reach and id(b) in reach and a.inputs and b.inputs):
            continue
        pa, pb = index[id(a.inputs[0])], index[id(b.inputs[0])]
        if nx.has_path(flow, pb, pa):
            found.append((pb, node, a, b))
        elif nx.has_path(flow, pa, pb):
            found.append((pa, node, b, a))
    order = {v: i for i, v in enumerate(nx.topological_sort(flow))}
    found.sort(key=lambda x: order[x[0]])
    return [Branch(i, node, hidden, skip) for i, (_, node, hidden, skip) in enumerate(found)]


def _probe_shapes(model, names: list[str]) -> dict[str, tuple[int, ...] | None]:
    """[C, H, W] of 4-D tensors on a copy whose symbolic input dims are fixed (a batch may stay
    unknown behind a Reshape); None for a tensor inference does not reach."""
    probe = model.copy()
    for t in probe.graph.inputs:
        if t.shape is None:
            continue
        t.shape = [d if isinstance(d, (int, np.integer)) and d > 0 else
                   (1 if i == 0 else _PROBE if len(t.shape) == 4 and i >= 2 else 77) for i, d in enumerate(t.shape)]
    inputs = {id(t) for t in probe.graph.inputs}
    tensors = probe.graph.tensors()
    for t in tensors.values():  # recorded symbolic shapes would win over the fixed ones
        if isinstance(t, gs.Variable) and id(t) not in inputs:
            t.shape = None
    infer_shapes(probe)
    out: dict[str, tuple[int, ...] | None] = {}
    for name in names:
        t = tensors.get(name)
        rest = t.shape[1:] if t is not None and t.shape is not None and len(t.shape) == 4 else None
        ok = rest is not None and all(isinstance(d, (int, np.integer)) and d > 0 for d in rest)
        out[name] = tuple(int(d) for d in rest) if ok else None
    return out


@register
class DeepCache(Pass):
    """DeepCache: cache the deep UNet feature at every N-th step; a shallow variant graph runs the steps between."""

    name = "deepcache"
    summary = "DeepCache: a shallow UNet variant reusing the deep feature cached every N steps, with its schedule"
    options = (
        Option("interval", int, 3, "cache interval N: the full graph every N-th step", positional=True, min=1, max=1000),
        Option("branch", int, 0, "skip branch whose re-entry is cached (0: conv_in's skip, the shallowest; "
               "DeepCache's cache_branch_id)", min=0, max=1000),
        Option("schedule", str, "uniform", "cache steps: uniform (every N-th) or quadratic (DeepCache's non-uniform)",
               choices=SPACINGS),
    )
    exact = True  # the full graph's outputs are unchanged; the shallow graph is a variant
    roles = ("unet",)

    def requires(self, model):
        if any(t.name == FEATURE for t in list(model.graph.inputs) + list(model.graph.outputs)):
            raise PassError(f"the graph already has {FEATURE!r} (deepcache ran on it before)")
        n = len(find_branches(model.graph))
        if n == 0:
            raise PassError("no skip Concat joining a down-path output in the up path (not a UNet?)")
        if self.opts.branch >= n:
            raise PassError(f"branch {self.opts.branch} does not exist: the UNet has {n} skip branches (0..{n - 1})")

    def run(self, model):
        graph = model.graph
        branches = find_branches(graph)
        br = branches[self.opts.branch]
        sample = _sample_input(graph)
        probed = _probe_shapes(model, [sample.name, br.hidden.name])
        s_shape, h_shape = probed[sample.name] or (4, _PROBE, _PROBE), probed[br.hidden.name]
        if h_shape is None:
            raise PassError(f"cannot infer the shape of the cached feature {br.hidden.name!r}")
        channels, downscale = h_shape[0], max(1, int(round(s_shape[1] / h_shape[1])))
        dtype = br.hidden.dtype if br.hidden.dtype is not None else sample.dtype
        dims = [sample.shape[0] if sample.shape else "batch", channels]
        for d in (sample.shape or [None] * 4)[2:]:
            dims.append(-(-int(d) // downscale) if isinstance(d, (int, np.integer)) and d > 0
                        else (f"{d}/{downscale}" if downscale > 1 else str(d)))

        shallow = model.copy()
        sg = shallow.graph
        node = next(n for n in sg.nodes if n.name == br.concat.name)
        hidden = node.inputs[[t.name for t in node.inputs].index(br.hidden.name)]
        feat_in = gs.Variable(FEATURE, dtype=dtype, shape=dims)
        replace_all_uses(sg, hidden, feat_in)
        sg.inputs.append(feat_in)
        remove_dead(sg)
        shallow.metadata = dict(shallow.metadata, **{"sdgraph.variant_of": model.metadata.get("sdgraph.role", "unet")})

        if br.hidden.name in {t.name for t in graph.outputs}:
            raise PassError(f"the cached feature {br.hidden.name!r} is already a graph output")
        br.hidden.name = FEATURE
        br.hidden.dtype, br.hidden.shape = dtype, dims
        graph.outputs.append(br.hidden)

        conv = {k: sum(1 for n in g.nodes if n.op == "Conv") for k, g in (("full", graph), ("shallow", sg))}
        base = model.metadata.get("sdgraph.role", "unet") or "unet"
        name = f"{base}_{SHALLOW}"
        entry = {"pass": self.spec(), "branch": self.opts.branch, "branches": len(branches),
                 "feature": {"input": FEATURE, "output": FEATURE, "from": base, "channels": channels, "downscale": downscale},
                 "nodes": len(sg.nodes), "conv": conv["shallow"]}
        schedule = deepcache_schedule(base, name, self.opts.interval, self.opts.schedule)
        return PassResult(
            modified=True,
            stats={"branch": self.opts.branch, "branches": len(branches), "concat": br.concat.name,
                   "feature": f"{channels}x/{downscale}", "nodes_full": len(graph.nodes),
                   "nodes_shallow": len(sg.nodes), "conv_full": conv["full"], "conv_shallow": conv["shallow"]},
            variants={name: Variant(shallow, entry)},
            schedule=schedule.to_json(),
            new_outputs=[FEATURE],
            notes=[f"deepcache: branch {self.opts.branch} of {len(branches)} ({br.concat.name}); {name} keeps "
                   f"{len(sg.nodes)} of {len(graph.nodes)} nodes ({conv['shallow']} of {conv['full']} Conv)"],
        )

    def ensures(self, model):
        if FEATURE not in {t.name for t in model.graph.outputs}:
            raise PassError(f"the full graph has no {FEATURE!r} output")
