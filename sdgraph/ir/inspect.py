"""A model summary a user reads: inputs, outputs, op histogram, parameters, role, attention count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sdgraph.ir.model import Model

__all__ = ["summarize", "attention_regions"]

_ATTENTION_OPS = {"Attention", "MultiHeadAttention", "ai.sdgraph::Attention", "com.microsoft::MultiHeadAttention",
                  "com.microsoft::Attention"}


def attention_regions(model: Model) -> int:
    """Softmax nodes (unfused attention) plus fused attention nodes of any form."""
    hist = model.op_histogram()
    return hist.get("Softmax", 0) + sum(n for op, n in hist.items() if op in _ATTENTION_OPS)


def _tensor_info(t) -> dict[str, Any]:
    shape = [d if isinstance(d, (int, np.integer)) else str(d) for d in (t.shape or [])]
    return {"name": t.name, "dtype": str(np.dtype(t.dtype)) if t.dtype is not None else "?", "shape": shape}


def summarize(src: str | Path | Model) -> dict[str, Any]:
    model = src if isinstance(src, Model) else Model.load(src)
    count, nbytes = model.parameters()
    ops = dict(sorted(model.op_histogram().items(), key=lambda kv: (-kv[1], kv[0])))
    return {
        "name": model.name,
        "role": model.role,
        "opset": model.opset,
        "nodes": model.num_nodes(),
        "parameters": count,
        "bytes": nbytes,
        "attention_regions": attention_regions(model),
        "inputs": [_tensor_info(t) for t in model.graph.inputs],
        "outputs": [_tensor_info(t) for t in model.graph.outputs],
        "ops": ops,
        "functions": sorted(f"{d}::{n}" for d, n in model.functions),
    }
