"""bf16 / fp16 after graph surgery (fold, fa, tome), as the seeds cast: on both exporters' tiny UNets and a model dir."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from sdgraph.errors import InputError
from sdgraph.ir import runtime as rt
from sdgraph.ir.model import Model
from sdgraph.passes._precision import run_any
from sdgraph.passes.manager import optimize_path
from tests.test_cli import sdgraph

pytestmark = pytest.mark.slow  # casts whole exported pipelines of three archs and runs them: minutes of CPU

def _is_16bit(dtype) -> bool:
    if dtype == onnx.TensorProto.BFLOAT16:  # a loaded graph keeps the ONNX enum (no numpy bfloat16 in gs)
        return True
    return np.dtype(dtype).itemsize == 2


PIPELINES = ("fold,bf16", "fa,bf16", "fold,fp16")  # the seeds cast after graph surgery


@pytest.mark.parametrize("fixture", ["tiny_sd15_onnx", "tiny_sd15_onnx_dynamo", "tiny_sdxl_onnx"])
def test_cast_after_surgery_runs_and_stays_close(fixture, request, tmp_path):
    src = request.getfixturevalue(fixture) / "unet" / "model.onnx"
    ref_model = Model.load(src)
    feeds = rt.seeded_inputs(ref_model, 2)
    ref = rt.run(ref_model, feeds)
    for spec in PIPELINES:
        out = tmp_path / f"{spec.replace(',', '_')}.onnx"
        reports = optimize_path(src, spec, out)
        rec = list(reports.values())[0].records[-1]
        assert rec.modified and rec.stats["low_nodes"] > 0, (spec, rec.stats)
        m = Model.load(out)
        kind = spec.rsplit(",", 1)[1]
        low = {"fp16": np.float16}.get(kind)
        convs = [n for n in m.graph.nodes if n.op == "Conv"]
        assert convs and all(_is_16bit(n.inputs[1].dtype) for n in convs), spec  # 16-bit weights
        if low is not None:  # fp16: ONNX Runtime's CPU provider runs it
            got, used = rt.run(m, feeds), "onnxruntime"
        else:  # bf16: ORT's CPU provider has no bfloat16 Conv/MatMul kernels; OpenVINO runs it
            with pytest.raises(InputError, match="bfloat16"):
                rt.session(m)
            got, used = run_any(m, feeds, runtime="openvino")
        cos = rt.worst(rt.compare(ref, got))["cosine"]
        assert cos > 0.999, (spec, used, cos)


def test_model_dir_cli_fold_bf16_and_fa_fp16(tiny_sd15_onnx, tmp_path):
    for spec in ("fold,bf16", "fa,fp16"):
        out = tmp_path / spec.replace(",", "_")
        res = sdgraph("optimize", tiny_sd15_onnx, "--passes", spec, "-o", out, "--submodels", "unet,text_encoder")
        assert res.returncode == 0, res.stderr
        for sub in ("unet", "text_encoder"):
            hist = Model.load(out / sub / "model.onnx").op_histogram()
            assert hist.get("Cast", 0) > Model.load(tiny_sd15_onnx / sub / "model.onnx").op_histogram().get("Cast", 0), (spec, sub)
