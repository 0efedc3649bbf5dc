"""Inlining canonical functions keeps node names unique and the numbers unchanged."""

from __future__ import annotations

import pytest
import numpy as np

from sdgraph.ir import runtime
from sdgraph.ir.canonical import inline_functions
from sdgraph.ir.model import Model
from sdgraph.passes import PassManager
from sdgraph.passes.manager import verify_structure


@pytest.mark.slow  # runs the exported UNet before and after inlining
def test_inline_tome_and_attention_bodies(tiny_unet_onnx):
    model = Model.load(tiny_unet_onnx)
    PassManager("fold,tome,fa,gn").run(model)
    hist = model.op_histogram()
    assert hist["ai.sdgraph::TomeMerge"] >= 1 and hist["ai.sdgraph::Attention"] >= 1
    feeds = runtime.seeded_inputs(model, seed=0)
    before = runtime.run(model, feeds)
    n = inline_functions(model)
    assert n == sum(c for op, c in hist.items() if op.startswith("ai.sdgraph::"))
    verify_structure(model)  # unique names, nothing dangling
    assert not [op for op in model.op_histogram() if op.startswith("ai.sdgraph::")]
    after = runtime.run(model, feeds)
    np.testing.assert_allclose(after["out_sample"], before["out_sample"], rtol=0, atol=1e-4)
