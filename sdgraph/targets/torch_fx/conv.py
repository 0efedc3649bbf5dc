"""Convolution: Conv (1-, 2- and 3-D, groups, dilations, asymmetric pads)."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from sdgraph.targets.torch_fx._values import torch_mod
from sdgraph.targets.torch_fx.registry import converter

__all__: list[str] = []


def _conv(x, w, b, strides, pads, dilations, group):
    torch = torch_mod()
    nd = x.dim() - 2
    half = pads[:nd]
    if list(half) != list(pads[nd:]):  # asymmetric: pad explicitly, then convolve unpadded
        flat = []
        for i in reversed(range(nd)):
            flat += [pads[i], pads[nd + i]]
        x = torch.nn.functional.pad(x, flat)
        half = [0] * nd
    fn = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[nd]
    return fn(x, w, b, stride=strides, padding=half, dilation=dilations, groups=group)


def _conv_ok(n: gs.Node, opset: int) -> str | None:
    auto_pad = n.attrs.get("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", b"NOTSET"):
        return f"auto_pad={auto_pad} not mapped (pads only)"
    w = n.inputs[1].shape if len(n.inputs) > 1 else None
    if w is not None and len(w) not in (3, 4, 5):
        return f"{len(w) - 2}-D convolution not mapped (1-D, 2-D, 3-D)"
    return None


@converter("Conv", supports=_conv_ok)
def conv(em, x):
    a, n = x.attrs, x.node
    nd = len(n.inputs[1].shape) - 2 if n.inputs[1].shape is not None else 2
    return [x.tensor_out(em.call(_conv, em.tensor(x.ins[0]), em.tensor(x.ins[1]), em.tensor(x.input(2)),
                                 list(a.get("strides", [1] * nd)), list(a.get("pads", [0] * 2 * nd)),
                                 list(a.get("dilations", [1] * nd)), int(a.get("group", 1))))]
