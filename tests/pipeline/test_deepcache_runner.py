"""A deepcache model dir as one pipeline: the runner's schedule exact (which graph at which step), every
target lowers both UNet graphs (static shapes where the target needs them) and runs them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from sdgraph.errors import InputError
from sdgraph.passes.deepcache import FEATURE
from sdgraph.passes.manager import optimize_path
from sdgraph.pipeline.runner import open_pipeline
from sdgraph.targets import lower

PROMPT = "a red bicycle"
UNIFORM_3 = ["unet", "unet_shallow", "unet_shallow"] * 3 + ["unet"]  # cache steps 0, 3, 6, 9 of 10
QUADRATIC_3 = ["unet", "unet_shallow", "unet", "unet", "unet_shallow", "unet_shallow", "unet"] + ["unet_shallow"] * 3


@pytest.fixture(scope="module")
def dc_dir(tiny_sd15_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("deepcache") / "sd15-dc"
    optimize_path(tiny_sd15_onnx, "fold,deepcache:3,fa,gn", out, submodels=["unet"])
    return out


def _generate(path, **kw):
    return open_pipeline(path).generate(PROMPT, steps=10, seed=3, scheduler="ddim", **kw)


def test_runner_follows_uniform_and_quadratic_schedules(dc_dir, tiny_sd15_onnx, tmp_path):
    g = _generate(dc_dir)
    assert g.unet_calls == UNIFORM_3
    # the tiny export has a static batch of 1: each step is two UNet calls (uncond, cond)
    assert g.stats["unet"]["calls"] == 2 * 4 and g.stats["unet_shallow"]["calls"] == 2 * 6
    plain = _generate(tiny_sd15_onnx)
    assert plain.unet_calls == ["unet"] * 10 and "unet_shallow" not in plain.stats
    a, b = (np.asarray(x.images[0], dtype=np.float64) for x in (g, plain))
    assert 0 < np.abs(a - b).mean() < 40  # the cached steps change the image, not beyond recognition
    quad = tmp_path / "quad"
    shutil.copytree(dc_dir, quad)
    manifest = json.loads((quad / "sdgraph.json").read_text())
    manifest["schedule"]["unet"]["cache"]["spacing"] = "quadratic"
    (quad / "sdgraph.json").write_text(json.dumps(manifest))
    assert _generate(quad).unet_calls == QUADRATIC_3
    # every step full (interval 1) is the plain pipeline, image for image
    manifest["schedule"]["unet"]["cache"] = {"interval": 1, "spacing": "uniform"}
    (quad / "sdgraph.json").write_text(json.dumps(manifest))
    same = _generate(quad)
    assert same.unet_calls == ["unet"] * 10
    assert np.array_equal(np.asarray(same.images[0]), np.asarray(plain.images[0]))
    # a schedule that calls the shallow graph first has no feature to give it: one line, before any work
    manifest["schedule"]["unet"] = {"rules": [{"steps": [0, 1], "variant": "unet_shallow"}]}
    (quad / "sdgraph.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="step 0 of 10 calls 'unet_shallow'"):
        _generate(quad)


def test_ort_artifact_holds_both_graphs_and_runs_the_schedule(dc_dir, tmp_path):
    out = tmp_path / "ort"
    res = lower(dc_dir, "ort", out, submodels=["unet", "text_encoder", "vae_decoder"])
    assert {"unet", "unet_shallow"} <= set(res.submodels)
    man = json.loads((out / "sdgraph.json").read_text())
    assert man["variants"]["unet_shallow"]["of"] == "unet" and man["schedule"]["unet"]["cache"]["interval"] == 3
    g = _generate(out)
    assert g.unet_calls == UNIFORM_3 and g.stats["unet_shallow"]["calls"] == 12


@pytest.mark.slow  # OpenVINO compiles each graph: ~20 s
def test_openvino_runs_the_schedule_end_to_end(dc_dir, tmp_path):
    pytest.importorskip("openvino")
    out = tmp_path / "ov"
    lower(dc_dir, "openvino", out, submodels=["unet", "text_encoder", "vae_decoder"])
    g = _generate(out)
    ref = _generate(dc_dir)
    assert g.unet_calls == UNIFORM_3
    assert np.abs(np.asarray(g.images[0], dtype=float) - np.asarray(ref.images[0], dtype=float)).max() <= 2


def test_torch_ascend_and_neural_engine_lower_both_graphs(dc_dir, tmp_path, monkeypatch):
    res = lower(dc_dir, "torch", tmp_path / "torch", options={"mode": "eager"}, submodels=["unet"], cache=False)
    assert set(res.submodels) == {"unet", "unet_shallow"}
    assert all((tmp_path / "torch" / s / "model.onnx").is_file() for s in res.submodels)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no atc: the target writes convert.sh with the shapes
    out = tmp_path / "ascend"
    # the UNet's bucket gives the variant's: the cached feature's dims derive from the sample's
    lower(dc_dir, "ascend310p", out, submodels=["unet"], shapes=[{"sample": (1, 4, 16, 16)}], cache=False)
    man = json.loads((out / "sdgraph.json").read_text())
    assert man["submodels"]["unet_shallow"]["shapes"] == [{"sample": [1, 4, 16, 16], FEATURE: [1, 32, 16, 16]}]
    script = (out / "unet_shallow" / "convert.sh").read_text()
    assert f"{FEATURE}:1,32,16,16" in script and (out / "unet" / "convert.sh").is_file()
    ne = tmp_path / "ne"
    lower(dc_dir, "neural-engine", ne, submodels=["unet"], cache=False)
    for sub in ("unet", "unet_shallow"):
        assert (ne / sub / "conf.yaml").is_file() and (ne / sub / "model.bin").is_file()
    ops = (ne / "unet_shallow" / "conf.yaml").read_text().count("type: Convolution")
    assert 0 < ops < (ne / "unet" / "conf.yaml").read_text().count("type: Convolution")
