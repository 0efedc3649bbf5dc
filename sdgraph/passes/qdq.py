"""qdq: static INT8 post-training quantization (QuantizeLinear/DequantizeLinear) with SD calibration.

A short driver over ``sdgraph.quant``: calibration inputs, scope, ranges, QDQ insertion, fidelity,
sensitivity and auto-exclude each live there.
"""

from __future__ import annotations

import hashlib

import numpy as np

from sdgraph.errors import PassError, UsageError
from sdgraph.ir.model import ROLES
from sdgraph.passes.base import Option, Pass, PassResult, register
from sdgraph.quant.scope import activation_matmuls, quantized_nodes, resolve_scope, watched_tensors

__all__ = ["Qdq", "quantized_nodes", "UNET_METHOD", "OTHER_METHOD"]

UNET_METHOD = "entropy"  # met held-back cosine >= 0.99 on the full-size SD1.5 UNet (docs/passes/qdq-calibration.md)
OTHER_METHOD = "minmax"


@register
class Qdq(Pass):
    """Static INT8 quantization as QuantizeLinear/DequantizeLinear pairs (onnxruntime.quantization).

    Cases handled:
      1. Calibration inputs by role from the model's own pipeline directory (sdgraph.quant.calibration):
         UNet along guided denoising trajectories, text encoder on tokenized prompts, VAE decoder
         on predicted clean latents; cached on disk, as are the calibrated ranges.
      2. ``calib_data=FILE.npz`` (or a folder of .npz, one sample each): inputs from a file, for a
         graph without a pipeline folder; the last ``held_out`` samples are held back.
      3. The seeds' ignored scope (conv_in, conv_out, time embedding, first shortcut conv), found
         structurally with names as fallback; ``exclude=`` adds names (``none`` drops the default).
      4. Conv, Gemm and MatMul with a constant weight are quantized (``act_matmul=true`` also
         quantizes activation x activation MatMuls such as attention scores).
      5. Fidelity on held-back inputs (other prompts and noise): cosine and max error in the stats.
      6. ``sensitivity=K``: per-layer error with only that layer quantized, for K sampled layers.
      7. ``auto_exclude=true`` with ``min_cosine``: keeps the most sensitive layers in float until
         the held-back cosine reaches ``min_cosine``.
      8. ``method=auto`` (the default): entropy ranges for the UNet (the method that met held-back
         cosine >= 0.99 on the full-size SD1.5 UNet), minmax for the other submodels; the method
         used is in the stats.
    """

    name = "qdq"
    summary = "Static INT8 quantization (QDQ) calibrated on Stable Diffusion trajectories"
    exact = False
    roles = ROLES
    options = (
        Option("calib", int, 16, "calibration samples", positional=True, min=1),
        Option("method", str, "auto", "range estimation (auto: entropy for the UNet, minmax for the others)",
               choices=("auto", "minmax", "percentile", "entropy")),
        Option("per_channel", bool, True, "per-output-channel weight scales"),
        Option("symmetric", bool, False, "symmetric int8 activations (default: asymmetric uint8)"),
        Option("exclude", list, ["default"], "node names/fragments kept in float; 'default' = SD scope, 'none' = nothing"),
        Option("act_matmul", bool, False, "also quantize activation x activation MatMuls"),
        Option("reduce_range", bool, True, "7-bit weights: ORT's x86 u8s8 kernels saturate with 8 (see README)"),
        Option("steps", int, 8, "scheduler steps per calibration trajectory", min=1),
        Option("prompt_file", str, "", "prompt list for calibration (default: sdgraph's shipped list)"),
        Option("calib_data", str, "", "calibration inputs from an .npz (arrays named as the graph inputs, leading axis = "
                                      "samples) or a folder of .npz (one sample each), instead of the model directory"),
        Option("held_out", int, 2, "held-back samples for the fidelity numbers", min=0),
        Option("sensitivity", int, 0, "layers to test one at a time for the sensitivity report", min=0),
        Option("auto_exclude", bool, False, "exclude the most sensitive layers until min_cosine is met"),
        Option("min_cosine", float, None, "fail (and steer auto_exclude) below this held-back cosine", min=-1, max=1),
        Option("cache", bool, True, "reuse cached calibration inputs and ranges"),
    )

    def method(self, model) -> str:
        """The range estimation used on ``model``: the option, or by role for ``auto``."""
        if self.opts.method != "auto":
            return self.opts.method
        return UNET_METHOD if model.role == "unet" else OTHER_METHOD

    def requires(self, model) -> None:
        if model.role not in self.roles:
            raise PassError(f"qdq: cannot calibrate a model of role {model.role!r}")
        if self.opts.auto_exclude and self.opts.min_cosine is None:
            raise UsageError("pass 'qdq': auto_exclude=true needs min_cosine=")

    def _feeds(self, model) -> tuple[list[dict], list[dict], list[str]]:
        """(calibration feeds, held-back feeds, notes) from calib_data or the model directory."""
        from sdgraph.quant.calibration import calibration_feeds

        if self.opts.calib_data:
            from sdgraph.quant.calib_file import load_calib_data

            samples = load_calib_data(self.opts.calib_data, model)
            n_held = self.opts.held_out if len(samples) > self.opts.held_out else 0
            notes = [] if n_held == self.opts.held_out else [
                f"calib_data has {len(samples)} sample(s): none held back for fidelity (needs more than held_out={self.opts.held_out})"]
            return samples[:len(samples) - n_held][:self.opts.calib], samples[len(samples) - n_held:], notes
        common = {"prompt_file": self.opts.prompt_file or None, "steps": self.opts.steps, "use_cache": self.opts.cache}
        feeds = calibration_feeds(model, self.opts.calib, **common)
        held = calibration_feeds(model, self.opts.held_out, holdout=True, **common) if self.opts.held_out else []
        return feeds, held, []

    def run(self, model) -> PassResult:
        from sdgraph.ir.model import Model
        from sdgraph.quant.modeldir import cache_dir
        from sdgraph.quant.ort import QuantConfig, calibrate_ranges, insert_qdq, workdir
        from sdgraph.quant.sensitivity import Fidelity, auto_exclude, sensitivity

        model.name_unnamed_nodes()
        method = self.method(model)
        excluded, notes = resolve_scope(model, self.opts.exclude)
        feeds, held, feed_notes = self._feeds(model)
        notes += feed_notes
        work = workdir()
        src = model.save_to_dir_unchecked(work, "float.onnx")
        key = hashlib.sha256(model.to_proto().SerializeToString())
        key.update(repr((sorted(excluded), self.opts.calib, method, self.opts.symmetric, self.opts.steps, self.opts.act_matmul, self.opts.prompt_file,
                         [sorted(f) for f in feeds[:1]], [float(np.asarray(v).ravel()[:8].sum()) for f in feeds for v in f.values()])).encode())
        ranges = cache_dir() / f"ranges-{key.hexdigest()[:24]}.json"
        if not self.opts.cache:
            ranges.unlink(missing_ok=True)
        ranges.parent.mkdir(parents=True, exist_ok=True)
        fidelity = Fidelity(model, held)
        if not ranges.is_file():
            calibrate_ranges(src, feeds, watched_tensors(model.graph, excluded, self.opts.act_matmul), method, ranges)

        cfg = QuantConfig(method, bool(self.opts.per_channel), bool(self.opts.symmetric), bool(self.opts.reduce_range))
        # ORT's MatMulConstBOnly is not honoured in QDQ mode: leave activation x activation MatMuls here.
        act_mm = [] if self.opts.act_matmul else activation_matmuls(model.graph)
        dst = work / "int8.onnx"
        insert_qdq(src, dst, cfg, ranges, excluded + act_mm)
        numbers = fidelity(dst)
        stats: dict = {"method": method, "calib_samples": len(feeds), "excluded": len(excluded)}
        ranked: list[tuple[str, dict]] = []
        if self.opts.sensitivity or self.opts.auto_exclude:
            layers = [n.name for n in quantized_nodes(Model.load(dst).graph)]
            ranked = sensitivity(layers, self.opts.sensitivity or 16, lambda name, out: insert_qdq(src, out, cfg, ranges, [], only=[name]),
                                 fidelity, work)
            stats["sensitivity"] = [[n, float(f"{1 - x['cosine']:.3g}"), float(f"{x['max_rel']:.3g}")]
                                    for n, x in ranked[:10]]  # [layer, 1 - cosine, max_rel], worst first
            notes.append(f"sensitivity: {len(ranked)} of {len(layers)} quantized layers tested one at a time")
        if self.opts.auto_exclude and numbers["cosine"] < self.opts.min_cosine:
            auto, numbers, dst = auto_exclude([n for n, _ in ranked], self.opts.min_cosine,
                                              lambda names, out: insert_qdq(src, out, cfg, ranges, excluded + act_mm + names),
                                              fidelity, work, numbers, dst)
            stats["auto_excluded"] = auto
            if numbers["cosine"] < self.opts.min_cosine:
                notes.append(f"auto_exclude reached cosine {numbers['cosine']:.6f} with {len(auto)} layer(s) excluded")
        q = Model.load(dst)
        q.metadata = dict(model.metadata)
        model.graph, model.base_dir = q.graph, q.base_dir
        model.opset_imports.update(q.opset_imports)  # ORT may raise the opset for Q/DQ features
        model.ir_version = max(model.ir_version, q.ir_version)
        model.functions.update(q.functions)
        hist = q.op_histogram()
        stats.update({
            "quantized": len(quantized_nodes(q.graph)),
            "quantize_linear": hist.get("QuantizeLinear", 0),
            "dequantize_linear": hist.get("DequantizeLinear", 0),
        })
        if held:
            stats["holdout_cosine"] = round(numbers["cosine"], 6)
            stats["holdout_max_rel"] = round(numbers["max_rel"], 6)
        if stats["quantized"] == 0:
            notes.append("no layer was quantized")
        return PassResult(modified=stats["quantized"] > 0, stats=stats, notes=notes)
