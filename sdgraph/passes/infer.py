"""infer: ONNX shape inference onto the graph (path-based for models over 2 GB)."""

from __future__ import annotations

from sdgraph.ir.shapes import infer_shapes
from sdgraph.passes.base import Option, Pass, PassResult, register

__all__ = ["Infer"]


@register
class Infer(Pass):
    """Annotate every intermediate tensor with its inferred shape and type.

    Cases handled:
      1. Static and symbolic dimensions, with data propagation through shape arithmetic.
      2. Models whose message would exceed 2 GB run through onnx's path-based inference.
    """

    name = "infer"
    summary = "Shape and type inference onto every intermediate tensor"
    options = (Option("data_prop", bool, True, "propagate values through shape arithmetic"),)

    def run(self, model) -> PassResult:
        changed = infer_shapes(model, data_prop=self.opts.data_prop)
        known = sum(1 for t in model.graph.tensors().values() if t.shape is not None)
        return PassResult(modified=False, stats={"shapes_updated": changed, "tensors_with_shape": known})
