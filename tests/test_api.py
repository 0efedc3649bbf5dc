"""The Python API: load, run a pipeline (text or Pass objects), save — the README's three lines."""

from __future__ import annotations

import numpy as np

import sdgraph
from sdgraph.ir import runtime
from sdgraph.passes import create_pass
from tests.graphs import mlp_model, save_external


def test_three_line_api(tmp_path):
    src = save_external(mlp_model(hidden=256), tmp_path / "in" / "model.onnx")
    model = sdgraph.load(src)
    report = sdgraph.optimize(model, "fold,cse", verify=True)
    out = model.save(tmp_path / "out")
    assert report.pipeline == "fold,cse"
    assert report.numbers is None or report.numbers["max_rel"] == 0.0
    assert report.records[0].stats["shape_folded"] == 0
    np.testing.assert_array_equal(runtime.run(sdgraph.load(out), seed=4)["y"], runtime.run(sdgraph.load(src), seed=4)["y"])


def test_pass_objects_and_text_mix(tmp_path):
    src = save_external(mlp_model(hidden=256), tmp_path / "in" / "model.onnx")
    model = sdgraph.load(src)
    report = sdgraph.optimize(model, [create_pass("fold", named={"max_growth": "16"}), "cse,infer"])
    assert report.pipeline == "fold{max_growth=16},cse,infer"
    assert [r.name for r in report.records] == ["fold", "cse", "infer"]
