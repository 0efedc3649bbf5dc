"""Spatial resampling and padding: Resize (nearest asymmetric/floor, (bi/tri)linear), Pad (constant, reflect, edge)."""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from sdgraph.targets.torch_fx._values import torch_mod
from sdgraph.targets.torch_fx.registry import converter

__all__: list[str] = []


def _pad(x, pads, value, mode, axes):
    torch = torch_mod()
    rank = x.dim()
    axes = list(range(rank)) if axes is None else [a + rank if a < 0 else a for a in axes]
    n = len(axes)
    begin = dict(zip(axes, pads[:n]))
    end = dict(zip(axes, pads[n:]))
    flat = []
    for a in reversed(range(rank)):
        flat += [begin.get(a, 0), end.get(a, 0)]
    if mode == "constant":
        return torch.nn.functional.pad(x, flat, value=float(value) if value is not None else 0.0)
    # torch pads only the spatial dims in these modes; the support check keeps batch and channel pads 0
    return torch.nn.functional.pad(x, flat[:2 * (rank - 2)], mode={"reflect": "reflect", "edge": "replicate"}[mode])


def _resize(x, scales, sizes, mode, ctm):
    torch = torch_mod()
    rank = x.dim()
    if sizes is not None and len(sizes):
        out = [int(s) for s in sizes][2:]
        sc = None
    else:
        sc = [float(s) for s in scales][2:]
        out = [int(math.floor(x.shape[2 + i] * sc[i])) for i in range(rank - 2)]
    if mode == "nearest":  # asymmetric + floor is torch's "nearest"; others are refused by the check
        return torch.nn.functional.interpolate(x, size=out, mode="nearest")
    m = {3: "linear", 4: "bilinear", 5: "trilinear"}[rank]
    if sc is not None and ctm != "align_corners":  # ONNX maps coordinates with the given scale
        return torch.nn.functional.interpolate(x, scale_factor=sc, mode=m, align_corners=False, recompute_scale_factor=False)
    return torch.nn.functional.interpolate(x, size=out, mode=m, align_corners=(ctm == "align_corners"))


def _given(n: gs.Node, i: int) -> bool:
    """Whether optional input ``i`` is present and not an empty constant."""
    t = n.inputs[i] if len(n.inputs) > i else None
    return bool(t is not None and t.name) and not (isinstance(t, gs.Constant) and t.values.size == 0)


def _pad_ok(n: gs.Node, opset: int) -> str | None:
    mode = n.attrs.get("mode", "constant")
    if mode not in ("constant", "reflect", "edge"):
        return f"pad mode {mode} not mapped (constant, reflect, edge)"
    if mode != "constant":
        pads = n.inputs[1] if len(n.inputs) > 1 else None
        if not isinstance(pads, gs.Constant):
            return f"{mode} pad with non-constant pads not mapped"
        p = np.asarray(pads.values).reshape(-1)
        half = len(p) // 2
        if _given(n, 3) or len(p) < 4 or p[[0, 1, half, half + 1]].any():
            return f"{mode} pad of batch or channel dims (or with axes) not mapped"
    return None


@converter("Pad", supports=_pad_ok)
def pad(em, x):
    pads = em.shape_arg(x.ins[1]) if len(x.ins) > 1 else list(x.attrs["pads"])
    value = em.scalar(x.input(2)) if x.input(2) is not None else x.attrs.get("value", 0.0)
    axes = em.shape_arg(x.input(3)) if x.input(3) is not None else None
    return [x.tensor_out(em.call(_pad, em.tensor(x.ins[0]), pads, value, x.attrs.get("mode", "constant"), axes))]


def _resize_ok(n: gs.Node, opset: int) -> str | None:
    a = n.attrs
    mode = a.get("mode", "nearest")
    ctm = a.get("coordinate_transformation_mode", "half_pixel")
    nearest = a.get("nearest_mode", "round_prefer_floor")
    if mode == "cubic":
        return "cubic resize not mapped"
    if mode == "nearest" and (ctm != "asymmetric" or nearest != "floor"):
        return f"nearest resize with {ctm}/{nearest} not mapped (asymmetric/floor only)"
    if mode == "linear" and ctm not in ("half_pixel", "align_corners"):
        return f"linear resize with {ctm} not mapped (half_pixel, align_corners)"
    if mode == "linear" and ctm == "align_corners" and _given(n, 2):
        return "align_corners linear resize by scales not mapped (give sizes)"
    if a.get("antialias", 0) or a.get("axes") is not None or a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        return "resize antialias/axes/keep_aspect_ratio_policy not mapped"
    if _given(n, 1):
        return "resize roi input not mapped"
    return None


@converter("Resize", supports=_resize_ok)
def resize(em, x):
    scales = None
    s = x.input(2)
    if s is not None:
        if s.lit is not None:  # constant scales as Python floats: no graph break
            scales = [float(v) for v in s.lit.reshape(-1)]
        elif s.shape_like:
            scales = s.v
        else:
            scales = em.method("tolist", s.v)
    sizes = em.shape_arg(x.input(3)) if x.input(3) is not None else None
    return [x.tensor_out(em.call(_resize, em.tensor(x.ins[0]), scales, sizes, x.attrs.get("mode", "nearest"),
                                 x.attrs.get("coordinate_transformation_mode", "half_pixel")))]
