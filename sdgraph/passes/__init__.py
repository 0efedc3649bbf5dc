"""Graph passes, one per module, registered by name (see ``sdgraph passes``)."""

from sdgraph.passes.base import Option, Pass, PassResult, Variant, create_pass, get_pass, register, registry
from sdgraph.passes.manager import PassManager, Report
from sdgraph.passes.pipeline import PRESETS, format_pipeline, parse_pipeline

__all__ = ["Option", "Pass", "PassResult", "Variant", "PassManager", "Report", "PRESETS", "create_pass", "get_pass",
           "register", "registry", "format_pipeline", "parse_pipeline"]
