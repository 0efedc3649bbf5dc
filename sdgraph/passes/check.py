"""check: the ONNX checker on the current graph (weights stay on disk, so it is cheap)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from sdgraph.errors import PassError
from sdgraph.ir import io
from sdgraph.passes.base import Option, Pass, PassResult, register

__all__ = ["Check"]


@register
class Check(Pass):
    """Run ``onnx.checker`` on the model without loading its weights.

    Cases handled:
      1. Models under 2 GB of graph message: checked in memory.
      2. Larger messages: written to a temporary folder and checked by path.
    """

    name = "check"
    summary = "ONNX checker (path-based for large models); fails with the checker's first line"
    options = (Option("full", bool, False, "also run strict shape inference inside the checker"),)

    def run(self, model) -> PassResult:
        proto = model.to_proto()
        external = [t for t in io.iter_tensors(proto.graph) if io.is_external(t)]
        try:
            if not external and proto.ByteSize() < 1_900_000_000:
                onnx.checker.check_model(proto, full_check=self.opts.full)
            else:
                # The checker resolves external files next to the model path and refuses links.
                # sdgraph.ir.io already validated every reference (inside the folder, present,
                # long enough) at load time, so the checker sees empty placeholder files.
                with tempfile.TemporaryDirectory(prefix="sdgraph-check-") as tmp:
                    path = Path(tmp) / "model.onnx"
                    for loc in {io.external_info(t)["location"] for t in external}:
                        link = Path(tmp) / loc
                        link.parent.mkdir(parents=True, exist_ok=True)
                        link.touch()
                    if proto.ByteSize() < 1_900_000_000:
                        path.write_bytes(proto.SerializeToString())
                    else:
                        io.write_proto(proto, path, model.base_dir)
                    onnx.checker.check_model(str(path), full_check=self.opts.full)
        except onnx.checker.ValidationError as exc:
            raise PassError(f"onnx checker: {str(exc).strip().splitlines()[0]}") from None
        return PassResult(modified=False, stats={"valid": True, "nodes": len(proto.graph.node)})
