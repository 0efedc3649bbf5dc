"""Normalizations and softmax: InstanceNormalization, GroupNormalization, LayerNormalization, (Log)Softmax."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from sdgraph.targets.torch_fx._values import torch_mod
from sdgraph.targets.torch_fx.registry import converter

__all__: list[str] = []


def _group_norm18(x, scale, bias, groups, eps):
    """Opset 18 GroupNormalization: scale and bias are per group."""
    torch = torch_mod()
    n = x.shape[0]
    xg = x.reshape(n, groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)
    y = (xg - mean) / torch.sqrt(var + eps)
    y = y * scale.reshape(1, groups, 1) + bias.reshape(1, groups, 1)
    return y.reshape(x.shape)


def _group_norm21(x, scale, bias, groups, eps):
    return torch_mod().nn.functional.group_norm(x, groups, scale, bias, eps)


def _instance_norm(x, scale, bias, eps):
    return torch_mod().nn.functional.instance_norm(x, weight=scale, bias=bias, eps=eps)


def _layer_norm(x, scale, bias, axis, eps):
    axis = axis + x.dim() if axis < 0 else axis
    return torch_mod().nn.functional.layer_norm(x, list(x.shape[axis:]), scale, bias, eps)


def _softmax(x, axis):
    return x.softmax(axis)


def _log_softmax(x, axis):
    return x.log_softmax(axis)


@converter("InstanceNormalization")
def instance_norm(em, x):
    return [x.tensor_out(em.call(_instance_norm, *(em.tensor(v) for v in x.ins[:3]), float(x.attrs.get("epsilon", 1e-5))))]


@converter("GroupNormalization")
def group_norm(em, x):
    fn = _group_norm21 if em.model.opset >= 21 else _group_norm18
    return [x.tensor_out(em.call(fn, *(em.tensor(v) for v in x.ins[:3]), int(x.attrs["num_groups"]),
                                 float(x.attrs.get("epsilon", 1e-5))))]


def _layer_norm_ok(n: gs.Node, opset: int) -> str | None:
    if any(o.name for o in n.outputs[1:]):
        return "LayerNormalization mean/inv_std outputs not mapped"
    return None


@converter("LayerNormalization", supports=_layer_norm_ok)
def layer_norm(em, x):
    return [x.tensor_out(em.call(_layer_norm, em.tensor(x.ins[0]), em.tensor(x.ins[1]), em.tensor(x.input(2)),
                                 int(x.attrs.get("axis", -1)), float(x.attrs.get("epsilon", 1e-5))))]


def _softmax_ok(n: gs.Node, opset: int) -> str | None:
    if opset < 13:
        return "opset < 13 softmax semantics (coerced 2-D) not mapped"
    return None


@converter("Softmax", "LogSoftmax", supports=_softmax_ok)
def softmax(em, x):
    fn = _softmax if x.node.op == "Softmax" else _log_softmax
    return [x.tensor_out(em.call(fn, em.tensor(x.ins[0]), int(x.attrs.get("axis", -1))))]
