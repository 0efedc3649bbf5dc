"""onnxruntime.quantization, narrowed to what sdgraph needs: range calibration and QDQ insertion."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

from sdgraph.progress import track
from sdgraph.quant.calibration import FeedReader

__all__ = ["QuantConfig", "workdir", "quiet_ort", "calibrate_ranges", "insert_qdq"]

_WORK_DIRS: list[Path] = []  # quantized weights live here until the process ends (the model reads them lazily)


@atexit.register
def _cleanup() -> None:
    for d in _WORK_DIRS:
        shutil.rmtree(d, ignore_errors=True)


def workdir() -> Path:
    """A temporary folder that lives until the process ends (quantized models read their weights from it)."""
    d = Path(tempfile.mkdtemp(prefix="sdgraph-qdq-"))
    _WORK_DIRS.append(d)
    return d


class _DropPreprocessHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-process" not in record.getMessage()


@contextlib.contextmanager
def quiet_ort():
    """Drop ORT's 'consider pre-processing' warning (sdgraph has already run shape inference)."""
    flt = _DropPreprocessHint()
    root = logging.getLogger()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    method: str = "minmax"  # minmax, percentile, entropy
    per_channel: bool = True
    symmetric: bool = False
    reduce_range: bool = True


_CALIBRATOR_ARGS = {
    "minmax": {"symmetric": False},
    "percentile": {"symmetric": True, "num_bins": 2048, "percentile": 99.999},
    "entropy": {"symmetric": False, "num_bins": 128, "num_quantized_bins": 128},
}


def calibrate_ranges(src: Path, feeds: list[dict[str, np.ndarray]], watch: set[str], method: str, ranges: Path) -> None:
    """Ranges of the ``watch`` tensors over ``feeds``, written to ``ranges``; one sample's activations in memory at a time.

    ORT's calibrators do the math; watching only the quantized layers' tensors avoids holding a
    512 px UNet's 1 GB attention-probability tensors, and ranges are merged after every sample.
    """
    from onnxruntime.quantization import calibrate as cal

    base = {"minmax": cal.MinMaxCalibrater, "percentile": cal.PercentileCalibrater, "entropy": cal.EntropyCalibrater}[method]

    class Narrow(base):
        def select_tensors_to_calibrate(self, m):
            tensors, infos = super().select_tensors_to_calibrate(m)
            return {t for t in tensors if t in watch}, infos

    with quiet_ort():
        calibrator = Narrow(src, None, str(src.parent / "augmented.onnx"), use_external_data_format=True,
                            **_CALIBRATOR_ARGS[method])
        calibrator.augment_graph()
        calibrator.create_inference_session()
        reader = FeedReader(feeds)
        for i in track(range(len(feeds)), "calibration ranges"):
            reader.set_range(i, i + 1)
            calibrator.collect_data(reader)
        cal.save_tensors_data(calibrator.compute_data(), ranges)
        del calibrator
    for f in src.parent.glob("augmented.onnx*"):
        f.unlink()


def insert_qdq(src: Path, dst: Path, cfg: QuantConfig, ranges: Path, excluded: Iterable[str],
               only: list[str] | None = None) -> None:
    """``src`` with QuantizeLinear/DequantizeLinear around its Conv/MatMul/Gemm layers, to ``dst``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[cfg.method]
    with quiet_ort():
        quantize_static(
            str(src), str(dst), None,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv", "MatMul", "Gemm"],
            per_channel=cfg.per_channel,
            reduce_range=cfg.reduce_range,
            activation_type=QuantType.QInt8 if cfg.symmetric else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=only,
            nodes_to_exclude=list(excluded),
            use_external_data_format=True,
            calibrate_method=method,
            extra_options={"ActivationSymmetric": cfg.symmetric, "WeightSymmetric": True},
            calibration_cache_path=str(ranges),
        )
