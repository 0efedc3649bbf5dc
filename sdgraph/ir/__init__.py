"""The sdgraph IR: Model over onnx-graphsurgeon, safe I/O, runtime helpers, canonical ops."""

from sdgraph.ir.model import CANONICAL_DOMAIN, ROLES, Model, detect_role

__all__ = ["Model", "detect_role", "ROLES", "CANONICAL_DOMAIN"]
