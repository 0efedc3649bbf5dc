"""simplify: onnxsim's simplifier, where it applies (loads the weights into memory)."""

from __future__ import annotations

import logging


from sdgraph.errors import TargetUnavailable
from sdgraph.passes.base import Option, Pass, PassResult, graph_signature, register

__all__ = ["Simplify"]

log = logging.getLogger(__name__)


@register
class Simplify(Pass):
    """Run onnxsim (constant propagation with ONNX Runtime, its own peephole rules).

    Cases handled:
      1. Any model onnxsim accepts; canonical ``ai.sdgraph`` functions are kept (skipped by
         onnxsim's checks). Run it before fusion passes.
      2. Without onnxsim installed, the pass fails with the extra to install.
      Note: onnxsim needs every weight in memory; ``fold`` does most of its work on disk.
    """

    name = "simplify"
    summary = "onnxsim simplifier (needs the 'simplify' extra; holds weights in memory)"
    options = (Option("check_n", int, 0, "random-input checks onnxsim runs itself", min=0),)

    def requires(self, model) -> None:
        try:
            import onnxsim  # noqa: F401
        except ImportError:
            raise TargetUnavailable("pass 'simplify' needs onnxsim: pip install 'sdgraph[simplify]'") from None

    def run(self, model) -> PassResult:
        import onnxsim
        from onnx.external_data_helper import load_external_data_for_model

        from sdgraph.ir.model import Model

        before, sig = model.num_nodes(), graph_signature(model)
        proto = model.to_proto()
        if model.base_dir is not None:
            load_external_data_for_model(proto, str(model.base_dir))
        simplified, ok = onnxsim.simplify(proto, check_n=self.opts.check_n, skip_shape_inference=False)
        if not ok:
            log.warning("onnxsim's own check failed; keeping its output for sdgraph's verifier to judge")
        new = Model.from_proto(simplified)
        new.path, new.metadata, new.functions = model.path, model.metadata, {**model.functions, **new.functions}
        model.assign(new)
        after = model.num_nodes()
        return PassResult(modified=graph_signature(model) != sig, stats={"nodes_removed": before - after})
