"""GraphBuilder: the one way passes add nodes to a graph (unique names, constants from arrays, outputs returned)."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import onnx_graphsurgeon as gs

__all__ = ["GraphBuilder"]


class GraphBuilder:
    """Append nodes to ``graph`` with names that are unique in it.

    ``b.op("MatMul", [a, w], name="proj")`` appends one node and returns its output Variable;
    inputs may be tensors or values (numpy arrays, lists, numbers), which become Constants named
    after the node. ``out=`` makes the node produce an existing tensor instead (its old producer
    loses it: the usual way a fusion takes over a matched region's output). ``node(...)`` is the
    general form for several outputs. Names are made unique with ``_1``, ``_2``... suffixes.
    """

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self._used = {n.name for n in graph.nodes if n.name} | set(graph.tensors())

    def unique(self, name: str) -> str:
        """``name``, or ``name_N`` with the smallest N not used yet; reserves the result."""
        cand, k = name, 0
        while cand in self._used:
            k += 1
            cand = f"{name}_{k}"
        self._used.add(cand)
        return cand

    def const(self, name: str, value: Any, dtype: Any = None) -> gs.Constant:
        arr = np.asarray(value, dtype=dtype)
        if dtype is None and not isinstance(value, np.ndarray) and arr.dtype == np.float64:
            arr = arr.astype(np.float32)  # Python floats: float32, ONNX's default float
        return gs.Constant(self.unique(name), arr)

    def var(self, name: str, dtype: Any = None, shape: Sequence | None = None) -> gs.Variable:
        return gs.Variable(self.unique(name), dtype=dtype, shape=shape)

    def node(
        self,
        op: str,
        inputs: Iterable[Any],
        outputs: Sequence[gs.Variable | str] | int = 1,
        *,
        name: str | None = None,
        attrs: dict[str, Any] | None = None,
        domain: str | None = None,
        dtype: Any = None,
    ) -> gs.Node:
        """Append a node; ``outputs`` are Variables (taken over), names, or a count of new Variables."""
        node_name = self.unique(name or op)
        ins = [t if isinstance(t, gs.Tensor) else self.const(f"{node_name}/in{i}", t) for i, t in enumerate(inputs)]
        if isinstance(outputs, int):
            outputs = [f"{node_name}/out{i}" if outputs > 1 else f"{node_name}/out" for i in range(outputs)]
        outs = []
        for o in outputs:
            if isinstance(o, gs.Tensor):
                o.inputs.clear()
                outs.append(o)
            else:
                outs.append(self.var(o, dtype=dtype))
        node = gs.Node(op, node_name, attrs=dict(attrs or {}), inputs=ins, outputs=outs, domain=domain or None)
        self.graph.nodes.append(node)
        return node

    def op(
        self,
        op: str,
        inputs: Iterable[Any],
        *,
        name: str | None = None,
        attrs: dict[str, Any] | None = None,
        domain: str | None = None,
        dtype: Any = None,
        out: gs.Variable | str | None = None,
    ) -> gs.Variable:
        """Append a one-output node and return its output (``out`` if given, else a new Variable)."""
        node = self.node(op, inputs, [out] if out is not None else 1, name=name, attrs=attrs, domain=domain, dtype=dtype)
        return node.outputs[0]
