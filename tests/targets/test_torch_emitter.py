"""The torch emitter against the ONNX backend node tests shipped in the onnx package, for every op it claims."""

from __future__ import annotations

import collections
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sdgraph.errors import UnsupportedError  # noqa: E402
from sdgraph.ir.model import Model  # noqa: E402
from sdgraph.targets.torch_fx import SUPPORTED_OPS, emit, unsupported_nodes  # noqa: E402

# Ops whose every backend case uses something the emitter refuses on purpose, with the reason.
ALL_REFUSED = {
    "LayerNormalization": "every case also asks for the Mean/InvStdDev outputs (training outputs; SD graphs use Y only)",
}
_NUMERIC_KINDS = "biuf"


@pytest.fixture(scope="module")
def cases():
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        all_cases = collect_testcases(None)
    by_op = collections.defaultdict(list)
    for c in all_cases:
        nodes = c.model.graph.node
        if len(nodes) == 1 and nodes[0].domain in ("", "ai.onnx") and nodes[0].op_type in SUPPORTED_OPS:
            by_op[nodes[0].op_type].append(c)
    return by_op


def _array(a):
    from onnx import TensorProto, numpy_helper

    return numpy_helper.to_array(a) if isinstance(a, TensorProto) else a


def _numeric(arrays) -> bool:
    return all(isinstance(a, (np.ndarray, np.generic)) and np.asarray(a).dtype.kind in _NUMERIC_KINDS and np.asarray(a).dtype.name in
               ("float32", "float64", "float16", "int8", "int16", "int32", "int64", "uint8", "bool") for a in arrays)


@pytest.mark.parametrize("op", sorted(SUPPORTED_OPS))
def test_backend_node_cases(op, cases):
    ran, refused, failures = 0, 0, []
    for c in cases.get(op, []):
        model = Model.from_proto(c.model)
        bad = unsupported_nodes(model)
        try:
            gm = emit(model)
        except UnsupportedError:
            assert bad, f"{c.name}: emit refused a node the check accepted"
            refused += 1
            continue
        for inputs, outputs in c.data_sets[:1]:
            inputs, outputs = [_array(a) for a in inputs], [_array(a) for a in outputs]
            if not _numeric(list(inputs) + list(outputs)):
                continue
            got = gm(*[torch.from_numpy(np.array(a)) for a in inputs])
            for g, want in zip(got, outputs):
                g = g.detach().numpy() if isinstance(g, torch.Tensor) else np.asarray(g)
                if g.shape != want.shape or not np.allclose(g.astype(np.float64), want.astype(np.float64),
                                                            rtol=c.rtol or 1e-3, atol=max(c.atol or 0, 1e-4), equal_nan=True):
                    failures.append(c.name)
                    break
            ran += 1
    assert not failures, f"{op}: emitter differs from the ONNX reference on {failures}"
    if op in ALL_REFUSED:
        assert ran == 0 and refused > 0
    elif cases.get(op):
        assert ran > 0, f"{op}: none of its {len(cases[op])} backend cases ran ({refused} refused)"
