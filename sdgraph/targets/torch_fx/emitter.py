"""Walks the graph in order and dispatches each node to its converter from the table."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx_graphsurgeon as gs

from sdgraph.errors import UnsupportedError
from sdgraph.ir.model import CANONICAL_DOMAIN, Model
from sdgraph.targets.torch_fx._values import SMALL_CONST, Val, const_array, has_node, ident, np_dtype_or_none, tdtype, torch_mod
from sdgraph.targets.torch_fx.registry import CONVERTERS, Converter

__all__ = ["Emitter", "NodeArgs", "converter_for", "unsupported_nodes", "emit"]

_STANDARD = ("", "ai.onnx")


def converter_for(node: gs.Node) -> Converter | None:
    d = node.domain or ""
    return CONVERTERS.get(("" if d in _STANDARD else d, node.op))


def _dtype_problem(n: gs.Node) -> str | None:
    for t in list(n.inputs) + list(n.outputs):
        if t.name and t.dtype is not None and np_dtype_or_none(t.dtype) is None:
            return f"dtype {t.dtype} of {t.name!r} not mapped (float32/16/64, int8-64, uint8, bool)"
    return None


def unsupported_nodes(model: Model) -> list[tuple[str, str, str]]:
    """(node, op, reason) for every node the emitter cannot take: no converter, or its support check refuses."""
    bad = []
    for n in model.graph.nodes:
        d = n.domain or ""
        conv = converter_for(n)
        if conv is None:
            if (d, n.op) in model.functions:  # inlined by the target's legalize step
                continue
            if d not in _STANDARD and d != CANONICAL_DOMAIN:
                bad.append((n.name, f"{d}::{n.op}", "no torch mapping for this domain"))
            else:
                bad.append((n.name, n.op if d in _STANDARD else f"{d}::{n.op}", "no torch converter for this op"))
            continue
        reason = _dtype_problem(n) or conv.supports(n, model.opset)
        if reason:
            bad.append((n.name, n.op, reason))
    return bad


class NodeArgs:
    """One node as a converter sees it: the node, its input values, attributes, output dtype and rank."""

    __slots__ = ("node", "ins", "attrs", "out_dtype", "out_rank")

    def __init__(self, node: gs.Node, ins: list[Val | None]):
        self.node, self.ins, self.attrs = node, ins, dict(node.attrs)
        out0 = node.outputs[0] if node.outputs else None
        self.out_dtype = out0.dtype if out0 is not None and out0.dtype is not None else (ins[0].dtype if ins and ins[0] else None)
        self.out_rank = len(out0.shape) if out0 is not None and out0.shape is not None else None

    def input(self, i: int) -> Val | None:
        """Input ``i``, or None when it is absent or empty (optional input)."""
        return self.ins[i] if len(self.ins) > i else None

    def tensor_out(self, v) -> Val:
        return Val(v, False, self.out_dtype)

    def shape_out(self, v) -> Val:
        return Val(v, True, self.out_dtype)

    @property
    def int_output(self) -> bool:
        return self.out_dtype is not None and np.issubdtype(np.dtype(self.out_dtype), np.integer)


class Emitter:
    """Builds one ``torch.fx`` graph: constants as buffers, small int constants as Python values."""

    def __init__(self, model: Model, keep_fp32: frozenset[str] = frozenset()):
        import torch.fx as fx

        self.torch = torch_mod()
        self.model = model
        self.keep_fp32 = keep_fp32  # node names run with autocast disabled, on float32 inputs
        self.root = self.torch.nn.Module()
        self.g = fx.Graph()
        self.env: dict[str, Val] = {}
        self.nconst = 0

    # values
    def const(self, t: gs.Constant) -> Val:
        arr = const_array(t)
        if np.issubdtype(arr.dtype, np.integer) and arr.ndim <= 1 and arr.size <= SMALL_CONST:
            return Val(arr.tolist(), True, arr.dtype)
        name = f"c{self.nconst}"
        self.nconst += 1
        ten = self.torch.from_numpy(np.ascontiguousarray(arr) if arr.dtype != np.bool_ else arr.copy())
        self.root.register_buffer(name, ten, persistent=False)
        return Val(self.g.get_attr(name), False, arr.dtype, arr.copy() if arr.size <= 16 else None)

    def val(self, t) -> Val | None:
        if t is None or (isinstance(t, gs.Variable) and not t.name):
            return None
        if t.name in self.env:
            return self.env[t.name]
        if isinstance(t, gs.Constant):
            v = self.const(t)
            self.env[t.name] = v
            return v
        raise UnsupportedError(f"tensor {t.name!r} is used before it is produced")

    def tensor(self, v: Val | None):
        """The value as a torch tensor (materializes shape arithmetic)."""
        if v is None:
            return None
        if not v.shape_like:
            return v.v
        from sdgraph.targets.torch_fx.shape_math import as_tensor

        return self.call(as_tensor, v.v, tdtype(v.dtype if v.dtype is not None else np.int64))

    def call(self, fn: Callable, *args: Any, **kwargs: Any):
        return self.g.call_function(fn, tuple(args), kwargs)

    def method(self, name: str, *args: Any, **kwargs: Any):
        return self.g.call_method(name, tuple(args), kwargs)

    def literal(self, v: Val | None):
        """A shape value as a Python literal when known at emission time, else None."""
        if v is None or not v.shape_like or has_node(v.v):
            return None
        return v.v

    def shape_arg(self, v: Val):
        """A value used as a list of ints (shape argument): Python value / fx node of one."""
        return v.v if v.shape_like else self.method("tolist", v.v)

    def scalar(self, v: Val):
        """A one-element value as a Python number (or an fx node of one)."""
        if v.shape_like:
            return v.v[0] if isinstance(v.v, list) else v.v
        return self.method("item", v.v)

    # emission
    def node(self, n: gs.Node) -> list[Val | None]:
        conv = converter_for(n)
        if conv is None:
            raise UnsupportedError(f"{n.name} ({n.op}): no torch converter for this op")
        x = NodeArgs(n, [self.val(t) for t in n.inputs])
        if n.name in self.keep_fp32:
            return self._fp32_region(conv, x)
        if conv.shape is not None:
            present = [v for v in x.ins if v is not None]
            if present and all(v.shape_like for v in present) and (x.out_rank is None or x.out_rank <= 1):
                r = conv.shape(self, x)
                if r is not None:
                    return r
        return conv.emit(self, x)

    def _fp32_region(self, conv, x: NodeArgs) -> list[Val | None]:
        """A kept node under bf16 autocast: autocast disabled around it, its float inputs back in float32."""
        from torch.amp.autocast_mode import _enter_autocast, _exit_autocast

        f32 = np.dtype(np.float32)
        x.ins = [Val(self.method("float", v.v), False, v.dtype) if v is not None and not v.shape_like and v.dtype == f32
                 else v for v in x.ins]
        ctx = self.call(_enter_autocast, "cpu", None, False, None)
        outs = conv.emit(self, x)
        self.call(_exit_autocast, ctx)
        return outs

    def run(self):
        import torch.fx as fx

        for t in self.model.graph.inputs:
            self.env[t.name] = Val(self.g.placeholder(ident(t.name)), False, t.dtype)
        for n in self.model.graph.nodes:
            try:
                outs = self.node(n)
            except UnsupportedError:
                raise
            except Exception as exc:
                raise UnsupportedError(f"torch emitter failed on {n.name} ({n.op}): {exc}".splitlines()[0]) from None
            for o, v in zip(n.outputs, outs):
                if o.name and v is not None:
                    self.env[o.name] = v
        results = []
        for t in self.model.graph.outputs:
            v = self.val(t)
            results.append(self.tensor(v))
        self.g.output(tuple(results))
        gm = fx.GraphModule(self.root, self.g)
        gm.input_names = [t.name for t in self.model.graph.inputs]
        gm.output_names = [t.name for t in self.model.graph.outputs]
        return gm


def emit(model: Model, keep_fp32=()):
    """A ``torch.fx.GraphModule`` computing ``model``: positional inputs in graph-input order, a tuple out.

    Canonical ``ai.sdgraph`` Attention maps to ``scaled_dot_product_attention``; other canonical ops
    without a converter must have been inlined. Raises UnsupportedError listing every node it cannot
    take as ``name (op): reason``.
    """
    bad = unsupported_nodes(model)
    if bad:
        raise UnsupportedError(f"{len(bad)} node(s) have no torch mapping", [f"{a} ({b}): {c}" for a, b, c in bad])
    return Emitter(model, frozenset(keep_fp32)).run()
