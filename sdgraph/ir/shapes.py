"""Shape inference that never serializes a protobuf over 2 GB (path-based when needed)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from sdgraph.errors import UsageError
from sdgraph.ir import io

__all__ = ["infer_shapes", "static_shape", "check_shape_names"]

log = logging.getLogger(__name__)
_PROTO_LIMIT = 1_900_000_000


def infer_shapes(model, data_prop: bool = True) -> int:
    """Run ONNX shape inference and write the results onto the graph's tensors.

    Weights stay external, so the message is small; if in-memory tensors still make it large,
    inference runs on a temporary file with onnx's path-based API. Returns how many tensors
    gained or changed a shape.
    """
    proto = model.to_proto()
    if proto.ByteSize() < _PROTO_LIMIT:
        try:
            inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=data_prop)
        except Exception as exc:  # inference is best effort: keep what we have
            log.warning("shape inference failed: %s", str(exc).splitlines()[0])
            return 0
    else:
        with tempfile.TemporaryDirectory(prefix="sdgraph-infer-") as tmp:
            src = Path(tmp) / "model.onnx"
            io.write_proto(proto, src, model.base_dir)
            dst = Path(tmp) / "inferred.onnx"
            onnx.shape_inference.infer_shapes_path(str(src), str(dst), check_type=False, strict_mode=False, data_prop=data_prop)
            inferred = onnx.load(str(dst), load_external_data=False)
    tensors = model.graph.tensors()
    changed = 0
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        t = tensors.get(vi.name)
        if not isinstance(t, gs.Variable) or not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        if t.shape != shape:
            t.shape = shape
            changed += 1
        if tt.elem_type and t.dtype is None:
            t.dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
    return changed


def static_shape(t: gs.Tensor) -> tuple[int, ...] | None:
    """The tensor's shape if every dimension is a known integer, else None."""
    if t.shape is None:
        return None
    if all(isinstance(d, (int, np.integer)) and d >= 0 for d in t.shape):
        return tuple(int(d) for d in t.shape)
    return None


def check_shape_names(buckets: Iterable[Mapping[str, Any]], models: Iterable) -> None:
    """Refuse a ``--shape`` name that is not an input of any of ``models`` (naming the inputs)."""
    known = {t.name for m in models for t in m.graph.inputs}
    missing = sorted({k for b in buckets for k in b if k not in known})
    if missing:
        raise UsageError(f"--shape names unknown input(s) {', '.join(missing)} (inputs: {', '.join(sorted(known))})")
