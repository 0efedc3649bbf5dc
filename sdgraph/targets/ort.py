"""The ``ort`` target: legalized ONNX plus an ORT-optimized model file and the session settings that matter."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx

from sdgraph.errors import InputError
from sdgraph.ir.canonical import inline_functions
from sdgraph.ir.model import Model
from sdgraph.passes.base import Option
from sdgraph.targets._legal import canonical_counts, run_pass_if_registered
from sdgraph.targets.base import Capability, LowerContext, Problem, Target, register_target

__all__ = ["OrtTarget", "OrtRunner"]

log = logging.getLogger(__name__)

_LEVELS = ("disabled", "basic", "extended", "all")
# contrib-op domains ONNX Runtime's CPU provider runs besides the standard one
_ORT_DOMAINS = ("com.microsoft", "com.microsoft.nchwc", "com.ms.internal.nhwc")


def _level(ort, name: str):
    return {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[name]


class OrtRunner:
    """An ONNX Runtime session over a built artifact; numpy in, numpy out by name."""

    def __init__(self, sess):
        self.session = sess
        self.input_names = [i.name for i in sess.get_inputs()]
        self.output_names = [o.name for o in sess.get_outputs()]

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, {k: feeds[k] for k in self.input_names})
        return dict(zip(self.output_names, outs))


@register_target
class OrtTarget(Target):
    """ONNX Runtime (CPU provider), the embedded default.

    1. legalize: the fusion engineer's ``ort-contrib`` pass when registered (canonical ops to
       com.microsoft contrib ops); remaining canonical calls are inlined to standard ops.
    2. build: writes ``model.onnx`` (+ ``model.onnx_data``) and, with ``optimized=true``, the model as
       ORT optimized it at ``opt_level`` (``model.opt.onnx``) so a load skips graph optimization;
       ``session.json`` records threads and levels.
    3. load: a session over the optimized file (optimizations off: already applied), else the plain one.
    """

    name = "ort"
    summary = "ONNX Runtime CPU: legalized ONNX + pre-optimized model file for fast loading"
    extra = None  # onnxruntime is a core dependency
    capability = Capability(
        ops=None,  # whatever ONNX Runtime runs; contrib domains are checked by name
        canonical_ops=frozenset(),
        dtypes=frozenset({"float32", "float16", "int64", "int32", "int8", "uint8", "bool"}),
        precisions=("fp32", "int8"),
        static_shapes=False,
    )
    options = (
        Option("threads", int, 0, "intra-op threads (0: ONNX Runtime's default, one per core)", min=0),
        Option("opt_level", str, "all", "graph optimization level baked into the optimized file", choices=_LEVELS),
        Option("optimized", bool, True, "write the ORT-optimized model file and load that (fast load)"),
        Option("contrib", bool, True, "lower canonical ops to com.microsoft contrib ops (ort-contrib pass) when available"),
    )

    def available(self) -> tuple[bool, str]:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:  # pragma: no cover - core dependency
            return False, f"onnxruntime does not import ({exc})"
        return True, ""

    def tool_versions(self) -> dict[str, str]:
        import onnxruntime as ort

        return {"onnxruntime": ort.__version__}

    def check(self, model: Model, ctx: LowerContext) -> list[Problem]:
        problems = []
        for n in model.graph.nodes:
            d = n.domain or ""
            if d not in ("", "ai.onnx", "ai.onnx.ml", *_ORT_DOMAINS) and (d, n.op) not in model.functions and d != "ai.sdgraph":
                problems.append(Problem(n.name, f"{d}::{n.op}", "ONNX Runtime has no kernel for this domain",
                                        "lower it with a pass to standard ops"))
        to_bf16 = [n for n in model.graph.nodes if n.op == "Cast" and n.attrs.get("to") == onnx.TensorProto.BFLOAT16]
        if to_bf16:  # ORT's CPU provider has almost no bfloat16 kernels: the session would fail to load
            problems.append(Problem(to_bf16[0].name, "Cast", f"{len(to_bf16)} casts to bfloat16: ONNX Runtime's CPU "
                                    "provider has no bfloat16 kernels for the ops between them",
                                    "lower to openvino or torch, or optimize with fp16 instead of bf16"))
        if ctx.precision == "int8" and not any(n.op in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "MatMulInteger")
                                                for n in model.graph.nodes):
            problems.append(Problem(model.name, "graph", "precision int8 needs a quantized (QDQ) graph",
                                    "run the qdq pass first (sdgraph optimize --passes qdq)"))
        return problems

    def legalize(self, model: Model, ctx: LowerContext) -> None:
        if ctx.options.get("contrib", True) and canonical_counts(model):
            if run_pass_if_registered(model, "ort-contrib"):
                log.info("%s: ran ort-contrib", ctx.submodel)
        inline_functions(model)

    def _session_options(self, ort, ctx: LowerContext, level: str):
        so = ort.SessionOptions()
        so.graph_optimization_level = _level(ort, level)
        so.log_severity_level = 3
        if ctx.options.get("threads"):
            so.intra_op_num_threads = int(ctx.options["threads"])
        return so

    def build(self, model: Model, out_dir: Path, ctx: LowerContext) -> dict[str, Any]:

        model.save_to_dir_unchecked(out_dir)
        entry: dict[str, Any] = {"model": "model.onnx", "dynamic": True}
        level = ctx.options.get("opt_level", "all")
        if ctx.options.get("optimized", True) and level != "disabled":
            self._write_optimized(out_dir, ctx, level)
            entry["optimized"] = "model.opt.onnx"
        settings = {"threads": int(ctx.options.get("threads") or 0), "opt_level": level,
                    "load_opt_level": "disabled" if "optimized" in entry else level,
                    "providers": ["CPUExecutionProvider"]}
        (out_dir / "session.json").write_text(json.dumps(settings, indent=2) + "\n")
        entry["session"] = settings
        return entry

    def _write_optimized(self, out_dir: Path, ctx: LowerContext, level: str) -> None:
        """``model.opt.onnx`` (+ data): the graph as ONNX Runtime optimized it at ``level``, for fast loading."""
        import onnxruntime as ort

        so = self._session_options(ort, ctx, level)
        so.optimized_model_filepath = str(out_dir / "model.opt.onnx")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "model.opt.onnx_data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            ort.InferenceSession(str(out_dir / "model.onnx"), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise InputError(f"{ctx.submodel}: ONNX Runtime cannot load the legalized graph: {str(exc).splitlines()[0]}") from None

    def refit_shared(self, sub_dir: Path, entry: Mapping[str, Any]) -> list[Path]:
        """The weight files of ``model.onnx`` and the optimized file: refit moves the changed tensors to each
        model's side file (``model.refit.onnx_data``) and never writes these."""
        import onnx

        from sdgraph.ir.io import external_data_files, side_data_file

        shared: list[Path] = []
        for name in [entry.get("model", "model.onnx")] + ([entry["optimized"]] if entry.get("optimized") else []):
            f = sub_dir / name
            if f.is_file():
                proto = onnx.load(str(f), load_external_data=False)
                shared += [p for p in external_data_files(proto, sub_dir) if p != side_data_file(f).resolve()]
        return shared

    def refit(self, sub_dir: Path, entry: Mapping[str, Any], changes, ctx: LowerContext) -> dict[str, Any]:
        """The changed tensors go to each model's side file (``model.refit.onnx_data``, ``model.opt.refit.onnx_data``),
        the big weight files stay as they are (hard links to the base artifact's), in ``model.onnx`` and in the
        optimized file where ONNX Runtime kept them as they were; an optimized file that transformed one (a
        layout change, a fusion) is optimized again from the refitted ``model.onnx``."""
        from sdgraph.ir.io import rewrite_initializers

        missed = rewrite_initializers(sub_dir / entry.get("model", "model.onnx"), {k: v[1] for k, v in changes.items()},
                                      side=True)
        if missed:
            raise InputError(f"{sub_dir}: corrupted artifact ({len(missed)} weight(s) such as {missed[0]!r} are not in "
                             f"{entry.get('model', 'model.onnx')} as lowered)")
        how = "none"
        if entry.get("optimized"):
            opt = sub_dir / entry["optimized"]
            missed = rewrite_initializers(opt, {k: v[1] for k, v in changes.items()}, expect={k: v[0] for k, v in changes.items()},
                                          side=True)
            how = "rewritten"
            if missed:  # ORT transformed some of them: optimize the refitted graph again
                from sdgraph.ir.io import side_data_file

                for f in (opt, opt.with_name(opt.name + "_data"), side_data_file(opt)):
                    f.unlink(missing_ok=True)  # unlinked, not truncated: the data file may be shared with the base
                self._write_optimized(sub_dir, ctx, dict(entry.get("session", {})).get("opt_level", "all"))
                how = f"optimized again ({len(missed)} tensor(s) transformed by ONNX Runtime)"
        return {"refit": {"tensors": len(changes), "optimized_file": how}}

    def load(self, artifact_dir: Path, entry: Mapping[str, Any], ctx: LowerContext) -> OrtRunner:
        import onnxruntime as ort

        settings = dict(entry.get("session", {}))
        file = artifact_dir / entry.get("optimized", entry.get("model", "model.onnx"))
        so = self._session_options(ort, ctx, settings.get("load_opt_level", "all"))
        if settings.get("threads"):
            so.intra_op_num_threads = int(settings["threads"])
        try:
            sess = ort.InferenceSession(str(file), so, providers=settings.get("providers", ["CPUExecutionProvider"]))
        except Exception as exc:
            raise InputError(f"{artifact_dir}: corrupted artifact, ONNX Runtime cannot load {file.name}: {str(exc).splitlines()[0]}") from None
        return OrtRunner(sess)
