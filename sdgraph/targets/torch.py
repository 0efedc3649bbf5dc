"""The ``torch`` target: sdgraph's own ONNX -> torch.fx emitter, then torch.compile with OneDiff-like modes."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from sdgraph.errors import InputError, UsageError
from sdgraph.ir.model import CANONICAL_DOMAIN, Model
from sdgraph.passes.base import Option
from sdgraph.progress import track
from sdgraph.targets.base import Capability, LowerContext, Problem, Target, register_target
from sdgraph.targets.torch_fx import CANONICAL_NATIVE, SUPPORTED_OPS, emit, unsupported_nodes

__all__ = ["TorchTarget", "TorchRunner"]

log = logging.getLogger(__name__)

_MODES = ("eager", "default", "max-autotune", "reduce-overhead", "cudagraphs")


class TorchRunner:
    """A GraphModule (compiled unless mode=eager) over numpy feeds; outputs back to numpy float32."""

    def __init__(self, gm, fn, input_names, output_names, precision: str, channels_last: bool, device: str):
        import torch

        self.torch = torch
        self.gm, self.fn = gm, fn
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.precision, self.channels_last, self.device = precision, channels_last, device

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        args = []
        for n in self.input_names:
            t = torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device)
            if self.channels_last and t.dim() == 4 and t.is_floating_point():
                t = t.contiguous(memory_format=torch.channels_last)
            args.append(t)
        with torch.inference_mode():
            if self.precision == "bf16":
                with torch.autocast("cpu" if self.device == "cpu" else "cuda", dtype=torch.bfloat16):
                    outs = self.fn(*args)
            else:
                outs = self.fn(*args)
        res = {}
        for n, o in zip(self.output_names, outs):
            o = o.detach()
            if o.dtype == torch.bfloat16:
                o = o.float()
            res[n] = o.cpu().contiguous().numpy()
        return res


@register_target
class TorchTarget(Target):
    """PyTorch through sdgraph's own emitter (``sdgraph.targets.torch_fx``).

    1. check: every node has an op-by-op torch mapping (canonical Attention/GroupNorm/GeGLU map natively:
       Attention -> ``scaled_dot_product_attention``); function bodies of other canonical ops are checked too.
    2. legalize: model-local functions without a native mapping are inlined.
    3. build: writes the legalized ONNX (the weights the GraphModule is built from), the emitted
       ``module.py`` (readable code of the GraphModule) and ``torch.json``; unless mode=eager, each declared
       shape bucket is compiled once at lowering so the inductor cache inside the artifact is warm.
    4. load: re-emits the GraphModule (seconds), ``torch.compile(mode, dynamic)`` with the artifact's
       inductor cache; ``channels_last`` converts 4-D weights and inputs; bf16 runs under autocast.
    """

    name = "torch"
    summary = "PyTorch: own ONNX->torch.fx emitter + torch.compile (default/max-autotune/cudagraphs), channels_last, dynamic"
    extra = "torch"
    capability = Capability(
        ops=None,  # checked node by node by each converter's support check (torch_fx.CONVERTERS)
        canonical_ops=CANONICAL_NATIVE,
        dtypes=frozenset({"float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool"}),
        precisions=("fp32", "bf16"),
        static_shapes=False,
        devices=("cpu", "cuda"),
    )
    options = (
        Option("mode", str, "default", "torch.compile mode (OneDiff's: default, max-autotune, cudagraphs on CUDA); eager: no compile",
               choices=_MODES),
        Option("channels_last", bool, False, "4-D weights and inputs in channels_last memory format"),
        Option("dynamic", bool, False, "torch.compile(dynamic=True): one graph for all shapes"),
        Option("device", str, "cpu", "cpu or cuda", choices=("cpu", "cuda")),
        Option("warmup", bool, True, "compile every shape bucket while lowering (warm inductor cache in the artifact)"),
    )

    def available(self) -> tuple[bool, str]:
        try:
            import torch  # noqa: F401
            import torch.fx  # noqa: F401
        except ImportError:
            return False, "torch is not installed"
        return True, ""

    def tool_versions(self) -> dict[str, str]:
        import torch

        return {"torch": torch.__version__}

    def parse_options(self, raw):
        opts = super().parse_options(raw)
        import torch

        if opts["device"] == "cuda" and not torch.cuda.is_available():
            raise UsageError("target 'torch': device=cuda but no CUDA device is visible here (use device=cpu)")
        if opts["mode"] == "cudagraphs" and opts["device"] != "cuda":
            raise UsageError("target 'torch': mode=cudagraphs needs device=cuda (CUDA graphs); use mode=default or max-autotune on CPU")
        return opts

    def check(self, model: Model, ctx: LowerContext) -> list[Problem]:
        problems = [Problem(n, op, why, "use --target ort or openvino, or a pass that rewrites it") for n, op, why in unsupported_nodes(model)]
        for (domain, name), fn in model.functions.items():
            if domain == CANONICAL_DOMAIN and name in CANONICAL_NATIVE:
                continue
            if not any((n.domain or "", n.op) == (domain, name) for n in model.graph.nodes):
                continue
            for fnode in fn.node:
                if fnode.domain in ("", "ai.onnx") and fnode.op_type not in SUPPORTED_OPS:
                    problems.append(Problem(f"{name}/{fnode.name or fnode.op_type}", fnode.op_type,
                                            f"op inside function {domain}::{name} has no torch mapping"))
        return problems

    def supports_precision_mode(self, precision: str) -> bool:
        return precision == "bf16"  # the runner's bf16 autocast; the keep list runs with autocast disabled

    def legalize(self, model: Model, ctx: LowerContext) -> None:
        from sdgraph.ir.canonical import inline_functions

        inline_functions(model, keep={(CANONICAL_DOMAIN, n) for n in CANONICAL_NATIVE})

    def build(self, model: Model, out_dir: Path, ctx: LowerContext) -> dict[str, Any]:
        model.save_to_dir_unchecked(out_dir)
        t0 = time.perf_counter()
        keep = sorted(ctx.precision_keep or ())
        gm = emit(model, keep)
        emit_s = time.perf_counter() - t0
        (out_dir / "module.py").write_text(gm.code)
        settings = {k: ctx.options[k] for k in ("mode", "channels_last", "dynamic", "device")}
        (out_dir / "torch.json").write_text(json.dumps(settings, indent=2) + "\n")
        entry: dict[str, Any] = {"model": "model.onnx", "module": "module.py", "settings": settings,
                                 "dynamic": True, "emit_s": round(emit_s, 3), "precision_keep": keep,
                                 "canonical_native": sorted({n.op for n in model.graph.nodes if (n.domain or "") == CANONICAL_DOMAIN})}
        if settings["mode"] != "eager" and ctx.options.get("warmup", True) and ctx.shapes:
            from sdgraph.ir.runtime import seeded_inputs

            runner = self._runner(gm, model, out_dir, settings, ctx.precision)
            times = []
            for b in track(ctx.shapes, f"torch.compile {ctx.submodel}"):
                feeds = seeded_inputs(model, 0, b)
                t1 = time.perf_counter()
                runner(feeds)
                times.append(round(time.perf_counter() - t1, 3))
            entry["warmup_compile_s"] = times
        entry["inductor_cache"] = "inductor-cache"
        return entry

    def _runner(self, gm, model_or_names, out_dir: Path, settings: Mapping[str, Any], precision: str) -> TorchRunner:
        import torch

        cache = out_dir / "inductor-cache"
        cache.mkdir(exist_ok=True)
        # inductor and the FX graph cache read this at compile time: point them at the artifact
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache.resolve())
        device = settings.get("device", "cpu")
        gm = gm.to(device)
        if settings.get("channels_last"):
            for name, buf in list(gm.named_buffers()):
                if buf.dim() == 4 and buf.is_floating_point():
                    setattr(gm, name, buf.contiguous(memory_format=torch.channels_last))
        mode = settings.get("mode", "default")
        if mode == "eager":
            fn = gm
        else:
            kwargs = {"dynamic": bool(settings.get("dynamic"))}
            if mode == "cudagraphs":
                kwargs["backend"] = "cudagraphs"
            elif mode != "default":
                kwargs["mode"] = mode
            fn = torch.compile(gm, **kwargs)
        ins = getattr(gm, "input_names", None) or [t.name for t in model_or_names.graph.inputs]
        outs = getattr(gm, "output_names", None) or [t.name for t in model_or_names.graph.outputs]
        return TorchRunner(gm, fn, ins, outs, precision, bool(settings.get("channels_last")), device)

    def refit(self, sub_dir: Path, entry: Mapping[str, Any], changes, ctx: LowerContext) -> dict[str, Any]:
        """The state dict is the artifact's ``model.onnx`` (the GraphModule's buffers are read from it at load):
        only the changed tensors' bytes are rewritten."""
        from sdgraph.ir.io import rewrite_initializers

        missed = rewrite_initializers(sub_dir / entry.get("model", "model.onnx"), {k: v[1] for k, v in changes.items()})
        if missed:
            raise InputError(f"{sub_dir}: corrupted artifact ({len(missed)} weight(s) such as {missed[0]!r} are not in "
                             f"{entry.get('model', 'model.onnx')} as lowered)")
        return {"refit": {"tensors": len(changes)}}

    def load(self, artifact_dir: Path, entry: Mapping[str, Any], ctx: LowerContext) -> TorchRunner:
        try:
            model = Model.load(artifact_dir / entry.get("model", "model.onnx"))
        except InputError as exc:
            raise InputError(f"{artifact_dir}: corrupted artifact ({exc})") from None
        gm = emit(model, entry.get("precision_keep", ()))
        return self._runner(gm, model, artifact_dir, dict(entry.get("settings", {})), ctx.precision)
