"""qdq: static INT8 post-training quantization (QuantizeLinear/DequantizeLinear) with SD calibration."""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from sdgraph.errors import PassError, UsageError
from sdgraph.passes._precision import default_scope, match_names
from sdgraph.passes.base import Option, Pass, PassResult, register

__all__ = ["Qdq", "quantized_nodes"]

log = logging.getLogger(__name__)

_WORK_DIRS: list[Path] = []  # quantized weights live here until the process ends (the model reads them lazily)


@atexit.register
def _cleanup() -> None:
    for d in _WORK_DIRS:
        shutil.rmtree(d, ignore_errors=True)


def _workdir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="sdgraph-qdq-"))
    _WORK_DIRS.append(d)
    return d


def quantized_nodes(graph) -> list:
    """Conv/Gemm/MatMul nodes whose inputs all come from DequantizeLinear (they run in INT8)."""
    out = []
    for n in graph.nodes:
        if n.op in ("Conv", "Gemm", "MatMul") and all(t.inputs and t.inputs[0].op == "DequantizeLinear" for t in n.inputs[:2]):
            out.append(n)
    return out


class _DropPreprocessHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-process" not in record.getMessage()


@contextlib.contextmanager
def _quiet_ort():
    """Drop ORT's 'consider pre-processing' warning (sdgraph has already run shape inference)."""
    flt = _DropPreprocessHint()
    root = logging.getLogger()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


@register
class Qdq(Pass):
    """Static INT8 quantization as QuantizeLinear/DequantizeLinear pairs (onnxruntime.quantization).

    Cases handled:
      1. Calibration inputs by role from the model's own pipeline directory (sdgraph.calibration):
         UNet along guided denoising trajectories, text encoder on tokenized prompts, VAE decoder
         on predicted clean latents; cached on disk, as are the calibrated ranges.
      2. The seeds' ignored scope (conv_in, conv_out, time embedding, first shortcut conv), found
         structurally with names as fallback; ``exclude=`` adds names (``none`` drops the default).
      3. Conv, Gemm and MatMul with a constant weight are quantized (``act_matmul=true`` also
         quantizes activation x activation MatMuls such as attention scores).
      4. Fidelity on held-back inputs (other prompts and noise): cosine and max error in the stats.
      5. ``sensitivity=K``: per-layer error with only that layer quantized, for K sampled layers.
      6. ``auto_exclude=true`` with ``min_cosine``: keeps the most sensitive layers in float until
         the held-back cosine reaches ``min_cosine``.
    """

    name = "qdq"
    summary = "Static INT8 quantization (QDQ) calibrated on Stable Diffusion trajectories"
    exact = False
    roles = ("unet", "text_encoder", "text_encoder_2", "vae_decoder", "vae_encoder")
    options = (
        Option("calib", int, 16, "calibration samples", positional=True, min=1),
        Option("method", str, "minmax", "range estimation", choices=("minmax", "percentile", "entropy")),
        Option("per_channel", bool, True, "per-output-channel weight scales"),
        Option("symmetric", bool, False, "symmetric int8 activations (default: asymmetric uint8)"),
        Option("exclude", list, ["default"], "node names/fragments kept in float; 'default' = SD scope, 'none' = nothing"),
        Option("act_matmul", bool, False, "also quantize activation x activation MatMuls"),
        Option("reduce_range", bool, True, "7-bit weights: ORT's x86 u8s8 kernels saturate with 8 (see README)"),
        Option("steps", int, 8, "scheduler steps per calibration trajectory", min=1),
        Option("prompt_file", str, "", "prompt list for calibration (default: sdgraph's shipped list)"),
        Option("held_out", int, 2, "held-back samples for the fidelity numbers", min=0),
        Option("sensitivity", int, 0, "layers to test one at a time for the sensitivity report", min=0),
        Option("auto_exclude", bool, False, "exclude the most sensitive layers until min_cosine is met"),
        Option("min_cosine", float, None, "fail (and steer auto_exclude) below this held-back cosine", min=-1, max=1),
        Option("cache", bool, True, "reuse cached calibration inputs and ranges"),
    )

    def requires(self, model) -> None:
        if model.role not in self.roles:
            raise PassError(f"qdq: cannot calibrate a model of role {model.role!r}")
        if self.auto_exclude and self.min_cosine is None:
            raise UsageError("pass 'qdq': auto_exclude=true needs min_cosine=")

    # -- helpers ------------------------------------------------------------------------------
    def _scope(self, model) -> tuple[list[str], list[str]]:
        names: list[str] = []
        notes: list[str] = []
        for item in self.exclude:
            if item == "default":
                found, n = default_scope(model)
                names += found
                notes += n
            elif item == "none":
                continue
            else:
                found = match_names(model.graph, [item])
                if not found:
                    raise UsageError(f"pass 'qdq': exclude={item!r} matches no node")
                names += found
        return list(dict.fromkeys(names)), notes

    def _calibrate(self, model, src: Path, feeds, excluded, ranges: Path) -> None:
        """Ranges for the tensors that will be quantized only, one sample's activations in memory at a time.

        ORT's calibrators do the math; sdgraph narrows what they watch to the inputs and outputs of
        the Conv/Gemm/MatMul nodes it will quantize (watching every MatMul input would hold a 512 px
        UNet's 1 GB attention-probability tensors), and merges ranges after every sample.
        """
        from onnxruntime.quantization import calibrate as cal

        from sdgraph.calibration import FeedReader

        watch = set()
        skip = set(excluded)
        for n in model.graph.nodes:
            if n.name in skip or n.op not in ("Conv", "Gemm", "MatMul"):
                continue
            if n.op == "MatMul" and not self.act_matmul and not isinstance(n.inputs[1], gs.Constant):
                continue  # attention scores / probabilities: not quantized, not watched
            watch.update(t.name for t in n.inputs[:2] if not isinstance(t, gs.Constant))
            watch.update(t.name for t in n.outputs)
        base = {"minmax": cal.MinMaxCalibrater, "percentile": cal.PercentileCalibrater,
                "entropy": cal.EntropyCalibrater}[self.method]

        class Narrow(base):
            def select_tensors_to_calibrate(self, m):
                tensors, infos = super().select_tensors_to_calibrate(m)
                return {t for t in tensors if t in watch}, infos

        kwargs = {"minmax": {"symmetric": False}, "percentile": {"symmetric": True, "num_bins": 2048, "percentile": 99.999},
                  "entropy": {"symmetric": False, "num_bins": 128, "num_quantized_bins": 128}}[self.method]
        calibrator = Narrow(src, None, str(src.parent / "augmented.onnx"), use_external_data_format=True, **kwargs)
        calibrator.augment_graph()
        calibrator.create_inference_session()
        reader = FeedReader(feeds)
        for i in range(len(feeds)):
            reader.set_range(i, i + 1)
            calibrator.collect_data(reader)
        cal.save_tensors_data(calibrator.compute_data(), ranges)
        del calibrator
        for f in src.parent.glob("augmented.onnx*"):
            f.unlink()

    def _quantize(self, src: Path, dst: Path, excluded, ranges: Path, only: list[str] | None = None) -> None:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                  "entropy": CalibrationMethod.Entropy}[self.method]
        extra = {
            "ActivationSymmetric": bool(self.symmetric),
            "WeightSymmetric": True,
        }
        with _quiet_ort():
            quantize_static(
            str(src), str(dst), None,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv", "MatMul", "Gemm"],
            per_channel=bool(self.per_channel),
            reduce_range=bool(self.reduce_range),
            activation_type=QuantType.QInt8 if self.symmetric else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=only,
            nodes_to_exclude=list(excluded),
            use_external_data_format=True,
            calibrate_method=method,
            extra_options=extra,
            calibration_cache_path=str(ranges),
            )

    # -- run ------------------------------------------------------------------------------------
    def run(self, model) -> PassResult:
        from sdgraph.calibration import cache_dir, calibration_feeds
        from sdgraph.ir import runtime as rt
        from sdgraph.ir.model import Model

        model.name_unnamed_nodes()
        excluded, notes = self._scope(model)
        feeds = calibration_feeds(model, self.calib, prompt_file=self.prompt_file or None, steps=self.steps,
                                  use_cache=self.cache)
        held = (calibration_feeds(model, self.held_out, prompt_file=self.prompt_file or None, steps=self.steps,
                                  holdout=True, use_cache=self.cache) if self.held_out else [])
        work = _workdir()
        src = model.save_to_dir_unchecked(work, "float.onnx")
        key = hashlib.sha256(model.to_proto().SerializeToString())
        key.update(repr((sorted(excluded), self.calib, self.method, self.symmetric, self.steps, self.act_matmul, self.prompt_file,
                         [sorted(f) for f in feeds[:1]], [float(np.asarray(v).ravel()[:8].sum()) for f in feeds for v in f.values()])).encode())
        ranges = cache_dir() / f"ranges-{key.hexdigest()[:24]}.json"
        if not self.cache:
            ranges.unlink(missing_ok=True)
        ranges.parent.mkdir(parents=True, exist_ok=True)

        ref_outs = []
        if held:
            ref_sess = rt.session(model)
            ref_outs = [ref_sess.run(None, f) for f in held]
            del ref_sess  # a 3.4 GB UNet session should not live through calibration

        def fidelity(path: Path) -> dict[str, float]:
            if not held:
                return {"cosine": float("nan"), "max_rel": float("nan")}
            sess = rt.session(path, optimize=True)  # QDQ fused into the integer kernels users run
            worst = {"cosine": 1.0, "max_rel": 0.0}
            for f, ref in zip(held, ref_outs):
                out = sess.run(None, f)
                w = rt.worst(rt.compare({str(i): r for i, r in enumerate(ref)}, {str(i): o for i, o in enumerate(out)}))
                worst = {"cosine": min(worst["cosine"], w["cosine"]), "max_rel": max(worst["max_rel"], w["max_rel"])}
            return worst

        if not ranges.is_file():
            with _quiet_ort():
                self._calibrate(model, src, feeds, excluded, ranges)
        dst = work / "int8.onnx"
        # ORT's MatMulConstBOnly is not honoured in QDQ mode: leave activation x activation MatMuls here.
        act_mm = [] if self.act_matmul else [n.name for n in model.graph.nodes
                                              if n.op == "MatMul" and not isinstance(n.inputs[1], gs.Constant)]
        excluded = excluded + act_mm
        self._quantize(src, dst, excluded, ranges)
        numbers = fidelity(dst)
        stats: dict = {"calib_samples": len(feeds), "excluded": len(excluded) - len(act_mm)}
        sensitivity: list[tuple[str, float]] = []
        auto: list[str] = []
        if self.sensitivity or self.auto_exclude:
            q = Model.load(dst)
            layers = [n.name for n in quantized_nodes(q.graph)]
            k = self.sensitivity or 16
            sample = [layers[i] for i in np.linspace(0, len(layers) - 1, min(k, len(layers))).round().astype(int)] if layers else []
            for i, name in enumerate(dict.fromkeys(sample)):
                one = work / f"one{i}.onnx"
                self._quantize(src, one, [], ranges, only=[name])
                sensitivity.append((name, fidelity(one)))
                for f in work.glob(f"one{i}.onnx*"):
                    f.unlink()
            sensitivity.sort(key=lambda x: (x[1]["cosine"], -x[1]["max_rel"]))
            stats["sensitivity"] = [[n, float(f"{1 - x['cosine']:.3g}"), float(f"{x['max_rel']:.3g}")]
                                    for n, x in sensitivity[:10]]  # [layer, 1 - cosine, max_rel], worst first
            notes.append(f"sensitivity: {len(sensitivity)} of {len(layers)} quantized layers tested one at a time")
        if self.auto_exclude and numbers["cosine"] < self.min_cosine:
            ranked = [n for n, _ in sensitivity]
            k = 1
            while numbers["cosine"] < self.min_cosine and k <= len(ranked):
                auto = ranked[:k]
                trial = work / f"auto{k}.onnx"
                self._quantize(src, trial, excluded + auto, ranges)
                numbers = fidelity(trial)
                dst = trial
                log.info("qdq auto_exclude %d layer(s): cosine %.6f", k, numbers["cosine"])
                k *= 2
            stats["auto_excluded"] = auto
            if numbers["cosine"] < self.min_cosine:
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
