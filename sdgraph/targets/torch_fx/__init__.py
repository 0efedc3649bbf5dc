"""ONNX -> torch.fx emitter: one GraphModule per graph, op by op, shape arithmetic kept as Python ints.

One converter per op or op family, each registered in ``CONVERTERS`` with its own support check:

- ``elementwise``: identity/cast, unary math, binary arithmetic and logic, activations, Where, Clip
- ``matmul``: MatMul, Gemm, Einsum
- ``conv``: Conv
- ``norm``: Instance/Group/LayerNormalization, Softmax, LogSoftmax
- ``reduce``: Reduce*, ArgMax/ArgMin, CumSum
- ``shape_ops``: shape, layout and indexing ops (with Python shape arithmetic)
- ``spatial``: Resize, Pad
- ``canonical``: sdgraph's Attention, GroupNorm(Silu), GeGLU

``emitter`` walks the graph and dispatches; ``unsupported_nodes`` asks every converter's check.
To add an op: a function ``emit(em, x)`` decorated with ``@converter("Op", supports=...)`` in the
family module (``x`` is the node's ``NodeArgs``; return one value per output).
"""

from __future__ import annotations

from sdgraph.ir.model import CANONICAL_DOMAIN
from sdgraph.targets.torch_fx import canonical, conv, elementwise, matmul, norm, reduce, shape_ops, spatial  # noqa: F401  (register)
from sdgraph.targets.torch_fx.emitter import emit, unsupported_nodes
from sdgraph.targets.torch_fx.registry import CONVERTERS, Converter, converter

__all__ = ["emit", "SUPPORTED_OPS", "unsupported_nodes", "CANONICAL_NATIVE", "CONVERTERS", "Converter", "converter"]

# standard ONNX ops with a converter
SUPPORTED_OPS = frozenset(op for (domain, op) in CONVERTERS if domain == "")
# canonical ops the emitter maps natively (others are inlined to standard ops first)
CANONICAL_NATIVE = frozenset(op for (domain, op) in CONVERTERS if domain == CANONICAL_DOMAIN)
