"""qdq{calib_data=...}: calibrating a bare unet.onnx from an .npz, and `sdgraph calib-data` that writes one."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from typer.testing import CliRunner

from sdgraph.cli import app
from sdgraph.errors import InputError
from sdgraph.ir import runtime as rt
from sdgraph.ir.model import Model
from sdgraph.passes.base import create_pass
from sdgraph.quant.calib_file import load_calib_data, save_calib_data
from sdgraph.quant.calibration import calibration_feeds
from tests.passes.precision_models import tiny_sd15_dir

pytestmark = pytest.mark.slow  # CLI runs that calibrate and quantize a UNet

FAST = {"calib": "3", "steps": "3", "held_out": "0"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("SDGRAPH_CACHE_DIR", str(cache))
    yield tiny_sd15_dir(), dict(os.environ, COLUMNS="200", SDGRAPH_CACHE_DIR=str(cache))
    mp.undo()


@pytest.fixture()
def bare(env, tmp_path):
    """The tiny export's UNet alone: bare/unet.onnx (+ its weights file), no tokenizer or scheduler beside it."""
    sd, _ = env
    out = tmp_path / "bare"
    out.mkdir()
    for f in (sd / "unet").iterdir():
        shutil.copy(f, out / ("unet.onnx" if f.name == "model.onnx" else f.name))
    return out / "unet.onnx"


def sdgraph(env, *args):
    return subprocess.run([sys.executable, "-m", "sdgraph", *map(str, args)], capture_output=True, text=True, env=env[1])


def _one_line_error(res, code, match):
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def _cosine(q: Model, ref: Model, held) -> float:
    sq, sr = rt.session(q, optimize=True), rt.session(ref)
    return min(rt.worst(rt.compare(dict(enumerate(sr.run(None, f))), dict(enumerate(sq.run(None, f)))))["cosine"] for f in held)


def test_bare_unet_without_source_names_calib_data(env, bare):
    with pytest.raises(InputError, match="pass calib_data=FILE.npz or run on a model directory"):
        create_pass("qdq", named=FAST).run(Model.load(bare))
    res = sdgraph(env, "optimize", bare, "--passes", "qdq{calib=2 steps=2 held_out=0}", "--out", bare.parent / "q")
    _one_line_error(res, 2, "calib_data=FILE.npz")


@pytest.mark.slow  # ~70 s on 2 shared cores: three CLI runs and two quantizations
def test_calib_data_command_then_bare_unet_quantizes_as_well_as_the_model_dir(env, bare, tmp_path):
    sd, _ = env
    npz = tmp_path / "inputs.npz"
    res = sdgraph(env, "calib-data", sd, "-o", npz, "--samples", 3, "--steps", 3)
    assert res.returncode == 0, res.stderr
    assert "3 samples for unet" in res.stdout
    unet = Model.load(sd / "unet" / "model.onnx")
    with np.load(npz) as z:
        assert sorted(z.files) == sorted(t.name for t in unet.graph.inputs)
        assert z["sample"].shape == (3, 2, 4, 16, 16) and z["timestep"].shape[0] == 3
        want = calibration_feeds(unet, 3, steps=3)
        for i, f in enumerate(want):  # the same inputs the model-dir path calibrates on
            for k, v in f.items():
                np.testing.assert_array_equal(z[k][i], v)
    again = sdgraph(env, "calib-data", sd, "-o", npz, "--samples", 2)
    _one_line_error(again, 2, "exists (use --force")

    before = hashlib.sha256(bare.read_bytes()).hexdigest()
    out = tmp_path / "int8"
    res = sdgraph(env, "optimize", bare, "--passes", f"qdq{{calib=3 steps=3 held_out=0 calib_data={npz}}}", "--out", out)
    assert res.returncode == 0, res.stderr
    assert hashlib.sha256(bare.read_bytes()).hexdigest() == before  # the input is untouched
    q_file = next(p for p in out.rglob("*.onnx"))
    q_bare = Model.load(q_file)
    assert q_bare.op_histogram()["QuantizeLinear"] > 0

    q_dir = Model.load(sd / "unet" / "model.onnx")
    create_pass("qdq", named=FAST).run(q_dir)
    held = calibration_feeds(unet, 2, steps=3, holdout=True)
    cos_bare, cos_dir = _cosine(q_bare, unet, held), _cosine(q_dir, unet, held)
    assert cos_bare > 0.95 and cos_bare >= cos_dir - 0.005, (cos_bare, cos_dir)


def test_folder_of_npz_and_held_out_split(env, bare, tmp_path):
    sd, _ = env
    unet = Model.load(sd / "unet" / "model.onnx")
    feeds = calibration_feeds(unet, 4, steps=2)
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, f in enumerate(feeds):
        np.savez(folder / f"s{i}.npz", **f)
    loaded = load_calib_data(folder, unet)
    assert len(loaded) == 4 and all(np.array_equal(a["sample"], b["sample"]) for a, b in zip(loaded, feeds))
    m = Model.load(bare)
    res = create_pass("qdq", named={"calib_data": str(folder), "held_out": "1"}).run(m)
    assert res.stats["calib_samples"] == 3 and 0.9 < res.stats["holdout_cosine"] <= 1.0  # 3 calibrate, 1 held back
    m = Model.load(bare)
    res = create_pass("qdq", named={"calib_data": str(folder), "held_out": "4"}).run(m)
    assert res.stats["calib_samples"] == 4 and "holdout_cosine" not in res.stats
    assert any("none held back" in n for n in res.notes)


def test_bad_calib_data_is_one_line_exit_2(env, bare, tmp_path):
    sd, _ = env
    unet = Model.load(sd / "unet" / "model.onnx")
    good = calibration_feeds(unet, 2, steps=2)
    cases = {}
    p = tmp_path / "wrong_name.npz"
    save_calib_data(p, [{("latents" if k == "sample" else k): v for k, v in f.items()} for f in good])
    cases[p] = "missing 'sample'; unexpected 'latents'"
    p = tmp_path / "wrong_shape.npz"
    save_calib_data(p, [{k: (v[:, :, :8] if k == "sample" else v) for k, v in f.items()} for f in good])
    cases[p] = "'sample' has shape (2, 4, 8, 16) per sample"
    p = tmp_path / "wrong_dtype.npz"
    save_calib_data(p, [{k: (v.astype(np.float64) if k == "sample" else v) for k, v in f.items()} for f in good])
    cases[p] = "'sample' has dtype float64, the graph input is float32"
    p = tmp_path / "not_npz.npz"
    p.write_text("not an archive\n")
    cases[p] = "not a readable .npz archive"
    p = tmp_path / "plain.npy"
    np.save(p, good[0]["sample"])
    cases[p] = "not an .npz archive"
    cases[tmp_path / "missing.npz"] = "calib_data file not found"
    for path, match in cases.items():
        with pytest.raises(InputError, match="") as info:
            load_calib_data(path, unet)
        assert match in str(info.value), (path, str(info.value))
    # through the CLI (in process): one line, exit 2, no output, for wrong name, wrong shape, not an npz
    for name in ("wrong_name.npz", "wrong_shape.npz", "not_npz.npz"):
        res = CliRunner().invoke(app, ["optimize", str(bare), "--passes", f"qdq{{calib_data={tmp_path / name}}}",
                                       "--out", str(tmp_path / "o")])
        assert res.exit_code == 2, res.output
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert lines[-1].startswith("error: ") and cases[tmp_path / name] in lines[-1], res.output
        assert sum(ln.startswith("error") for ln in lines) == 1 and "Traceback" not in res.output
        assert not (tmp_path / "o").exists()
    # calib-data without a model directory around the submodel: one line, exit 2, nothing written
    res = sdgraph(env, "calib-data", bare.parent, "-o", tmp_path / "x.npz")
    _one_line_error(res, 2, "is it an exported model directory with a unet")
    assert not (tmp_path / "x.npz").exists()
