"""sdgraph: one compiler for Stable Diffusion graphs (ONNX in, target artifacts out)."""

from sdgraph._version import __version__

from sdgraph.errors import SdgraphError
from sdgraph.ir.model import Model


def load(path) -> Model:
    """Load one ONNX model (a ``.onnx`` file or a folder holding ``model.onnx``)."""
    return Model.load(path)


def optimize(model, passes, **kwargs):
    """Run a pipeline (text like ``"fold,fa"`` or Pass objects) on ``model``; returns a Report."""
    from sdgraph.passes.manager import PassManager

    return PassManager(passes, **kwargs).run(model)


def lower(src, target: str, out, **kwargs):
    """Lower a model file or model directory to ``target``; see ``sdgraph.targets``."""
    from sdgraph.targets import lower as _lower

    return _lower(src, target, out, **kwargs)


__all__ = ["Model", "SdgraphError", "load", "optimize", "lower", "__version__"]
