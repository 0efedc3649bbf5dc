"""``sdgraph refit``: a lowered artifact with LoRAs folded in equals lowering the LoRA-fused graph; --remove restores it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sdgraph.errors import InputError, UsageError
from sdgraph.passes.manager import optimize_path
from sdgraph.targets.driver import load_artifact, lower
from sdgraph.targets.refit import parse_lora_arg, refit
from tests.lora_models import make_lora

SUBS = ["text_encoder", "unet"]


@pytest.fixture(scope="module")
def work(tiny_sd15_pipeline, tiny_sd15_onnx, tmp_path_factory):
    d = tmp_path_factory.mktemp("refit")
    lora = make_lora(tiny_sd15_pipeline, d / "a.safetensors", seed=3)
    optimize_path(tiny_sd15_onnx, f"lora{{file={lora} scale=0.8}}", d / "fused", submodels=SUBS)
    return {"dir": d, "lora": lora, "src": tiny_sd15_onnx}


def _feeds(runner, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    table = {"sample": rng.standard_normal((1, 4, 16, 16)).astype(np.float32), "timestep": np.array([500.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((1, 77, 32)).astype(np.float32),
             "input_ids": rng.integers(0, 1000, (1, 77)).astype(np.int64)}
    return {n: table[n] for n in runner.input_names}


def _outs(artifact: Path, seed: int = 0) -> dict[str, np.ndarray]:
    art = load_artifact(artifact)
    return {s: next(iter(art.runner(s)(_feeds(art.runner(s), seed)).values())) for s in SUBS}


def _lower(src: Path, target: str, out: Path, **kw) -> Path:
    lower(src, target, out, submodels=SUBS, cache=False, **kw)
    return out


def test_parse_lora_arg():
    assert parse_lora_arg("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora_arg("/x/a.safetensors:0.5") == ("/x/a.safetensors", 0.5)
    assert parse_lora_arg("C:/x/a.safetensors") == ("C:/x/a.safetensors", 1.0)
    with pytest.raises(UsageError, match="lora scale"):
        parse_lora_arg("a.safetensors:1e9")


@pytest.mark.slow
def test_ort_refit_equals_lowering_the_fused_graph_and_remove_restores(work):
    d = work["dir"]
    base = _lower(work["src"], "ort", d / "ort-base")
    fused = _lower(d / "fused", "ort", d / "ort-fused")
    res = refit(base, [(str(work["lora"]), 0.8)], d / "ort-refit")
    assert res.submodels["unet"]["tensors"] == 44 and res.submodels["text_encoder"]["tensors"] == 10
    manifest = json.loads((d / "ort-refit" / "sdgraph.json").read_text())
    assert [(Path(a["file"]).name, a["scale"]) for a in manifest["lora"]["applied"]] == [("a.safetensors", 0.8)]
    got, want, before = _outs(d / "ort-refit"), _outs(fused), _outs(base)
    for s in SUBS:
        assert np.abs(before[s] - want[s]).max() > 1e-3  # the LoRA matters...
        np.testing.assert_array_equal(got[s], want[s])  # ...and refit gives the fused lowering's numbers
    # the big weight files are shared with the base (hard links, never written); the changed tensors live
    # in each model's side file; the input artifact is untouched
    # (this LoRA has conv weights, which ONNX Runtime keeps in its NCHWc layout: the optimized file is new)
    how = {s: manifest["submodels"][s]["refit"]["optimized_file"] for s in SUBS}
    assert how["text_encoder"] == "rewritten" and how["unet"].startswith("optimized again"), how
    for s, f in [(s, "model.onnx_data") for s in SUBS] + [("text_encoder", "model.opt.onnx_data")]:
        a, b = (base / s / f).stat(), (d / "ort-refit" / s / f).stat()
        assert (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev), (s, f)
    side = d / "ort-refit" / "unet" / "model.refit.onnx_data"
    assert 0 < side.stat().st_size < (base / "unet" / "model.onnx_data").stat().st_size / 2
    assert not (base / "unet" / "model.refit.onnx_data").exists()
    np.testing.assert_array_equal(_outs(base)["unet"], before["unet"])
    # --remove writes the base weights back bit for bit
    refit(d / "ort-refit", [], d / "ort-removed", remove=True)
    for s in SUBS:
        assert (base / s / "model.onnx_data").read_bytes() == (d / "ort-removed" / s / "model.onnx_data").read_bytes()
        assert not (d / "ort-removed" / s / "lora-base.npz").exists()
        np.testing.assert_array_equal(_outs(d / "ort-removed")[s], before[s])
    assert "lora" not in json.loads((d / "ort-removed" / "sdgraph.json").read_text())
    # twice the same LoRA at half the scale, then removed: base again (no drift through the backup)
    refit(d / "ort-refit", [(str(work["lora"]), -0.8)], d / "ort-zero")
    np.testing.assert_allclose(_outs(d / "ort-zero")["unet"], before["unet"], rtol=0, atol=1e-4)
    refit(d / "ort-zero", [], d / "ort-zero-removed", remove=True)
    assert (base / "unet" / "model.onnx_data").read_bytes() == (d / "ort-zero-removed" / "unet" / "model.onnx_data").read_bytes()


def test_refit_bad_input(work, tmp_path):
    d = work["dir"]
    base = d / "ort-base" if (d / "ort-base").exists() else _lower(work["src"], "ort", d / "ort-base")
    with pytest.raises(UsageError, match="nothing to do"):
        refit(base, [], tmp_path / "o")
    corrupt = tmp_path / "c.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(InputError, match="not a valid safetensors"):
        refit(base, [(str(corrupt), 1.0)], tmp_path / "o")
    from safetensors.numpy import save_file

    other = tmp_path / "xl.safetensors"
    save_file({"unet.add_embedding.linear_1.lora_A.weight": np.ones((4, 2816), np.float32),
               "unet.add_embedding.linear_1.lora_B.weight": np.ones((1280, 4), np.float32)}, str(other))
    with pytest.raises(InputError, match="another architecture"):
        refit(base, [(str(other), 1.0)], tmp_path / "o")
    assert not (tmp_path / "o").exists()
    # the command: one error line, exit 2
    p = subprocess.run([sys.executable, "-m", "sdgraph", "refit", str(base), "--lora", f"{corrupt}:0.5", "-o", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and p.stderr.startswith("error:"), p.stderr


def test_refit_command(work, tmp_path):
    d = work["dir"]
    base = d / "ort-base" if (d / "ort-base").exists() else _lower(work["src"], "ort", d / "ort-base")
    p = subprocess.run([sys.executable, "-m", "sdgraph", "refit", str(base), "--lora", f"{work['lora']}:0.8",
                        "-o", str(tmp_path / "new")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "LoRAs applied: a.safetensors:0.8" in " ".join(p.stdout.split())
    from tests.test_cli_json import check

    p = subprocess.run([sys.executable, "-m", "sdgraph", "refit", str(tmp_path / "new"), "--remove", "--json",
                        "-o", str(tmp_path / "removed")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    check("sdgraph refit --json", data)
    assert data["applied"] == [] and data["submodels"]["unet"]["tensors"] == 44
    applied = json.loads((tmp_path / "new" / "sdgraph.json").read_text())["lora"]["applied"]
    assert applied[0]["sha256"].startswith("sha256:") and applied[0]["scale"] == 0.8


@pytest.mark.slow
def test_openvino_refit_equals_lowering_the_fused_graph(work):
    pytest.importorskip("openvino")
    d = work["dir"]
    base = _lower(work["src"], "openvino", d / "ov-base")
    fused = _lower(d / "fused", "openvino", d / "ov-fused")
    refit(base, [(str(work["lora"]), 0.8)], d / "ov-refit")
    got, want = _outs(d / "ov-refit"), _outs(fused)
    for s in SUBS:
        np.testing.assert_array_equal(got[s], want[s])
        # weightless blobs (the default): the weights are read from model.bin at load, so refit keeps the blob
        entry = json.loads((d / "ov-refit" / "sdgraph.json").read_text())["submodels"][s]
        assert entry["weightless"] and entry["refit"]["blobs"].startswith("kept"), entry
        blob = entry["blobs"][0]
        assert (d / "ov-refit" / s / blob).read_bytes() == (base / s / blob).read_bytes()
        assert (base / s / blob).stat().st_size < (base / s / "model.bin").stat().st_size / 2
    refit(d / "ov-refit", [], d / "ov-removed", remove=True)
    assert (base / "unet" / "model.bin").read_bytes() == (d / "ov-removed" / "unet" / "model.bin").read_bytes()
    # blobs with their weights: refit compiles and exports them again
    full = _lower(work["src"], "openvino", d / "ov-full", options={"weightless": "false"})
    refit(full, [(str(work["lora"]), 0.8)], d / "ov-full-refit")
    got = _outs(d / "ov-full-refit")
    for s in SUBS:
        np.testing.assert_array_equal(got[s], want[s])
        entry = json.loads((d / "ov-full-refit" / "sdgraph.json").read_text())["submodels"][s]
        assert not entry["weightless"] and entry["refit"]["blobs"] == "compiled again", entry


def test_torch_refit_equals_lowering_the_fused_graph(work):
    """torch: the GraphModule's weights come from the artifact's model.onnx at load, so refit rewrites its data."""
    pytest.importorskip("torch")
    d = work["dir"]
    opts = {"mode": "eager", "warmup": "false"}
    base = _lower(work["src"], "torch", d / "torch-base", options=opts)
    fused = _lower(d / "fused", "torch", d / "torch-fused", options=opts)
    res = refit(base, [(str(work["lora"]), 0.8)], d / "torch-refit")
    assert res.submodels["unet"]["tensors"] == 44 and res.submodels["text_encoder"]["tensors"] == 10
    got, want, before = _outs(d / "torch-refit"), _outs(fused), _outs(base)
    for s in SUBS:
        assert np.abs(before[s] - want[s]).max() > 1e-3
        np.testing.assert_allclose(got[s], want[s], rtol=0, atol=1e-5)
    refit(d / "torch-refit", [], d / "torch-removed", remove=True)
    np.testing.assert_array_equal(_outs(d / "torch-removed")["unet"], before["unet"])


def test_weightless_blob_is_kept_only_for_weights_read_at_import():
    """A weightless blob reads a MatMul/Convolution weight (or its f16 Convert) from model.bin at import; an INT8
    weight's dequantization is folded into the blob, so rewriting its Const needs a new compile."""
    import xml.etree.ElementTree as ET

    from sdgraph.targets.openvino import _read_at_import

    ir = ET.fromstring(
        '<net><layers><layer id="0" type="Const"/><layer id="1" type="MatMul"/><layer id="2" type="Const"/>'
        '<layer id="3" type="Convert"/><layer id="4" type="Convolution"/><layer id="5" type="Const"/>'
        '<layer id="6" type="Convert"/><layer id="7" type="Subtract"/><layer id="8" type="Const"/></layers><edges>'
        '<edge from-layer="0" to-layer="1"/><edge from-layer="2" to-layer="3"/><edge from-layer="3" to-layer="4"/>'
        '<edge from-layer="5" to-layer="6"/><edge from-layer="6" to-layer="7"/></edges></net>')
    types = {x.get("id"): x.get("type") for x in ir.iter("layer")}
    assert _read_at_import(ir, types, {"0", "2"})
    assert not _read_at_import(ir, types, {"0", "5"})  # the INT8 weight's Convert feeds a Subtract
    assert not _read_at_import(ir, types, {"8"})  # no consumer: not a weight we know


def _cos(a, b) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.slow
def test_int8_refit_within_a_fresh_quantization(work, tiny_sd15_pipeline):
    """INT8: refit requantizes only the touched weights and keeps the activation scales of the base calibration.
    With a LoRA of a realistic strength (it moves the UNet's output, not its activation ranges), against the
    float LoRA-fused UNet on held-back inputs, refit's cosine is that of quantizing the fused graph afresh
    (calibrated again), within 0.002."""
    d = work["dir"]
    lora = make_lora(tiny_sd15_pipeline, d / "gentle.safetensors", seed=4, strength=0.02, text_targets=[])
    optimize_path(work["src"], f"lora:{lora}", d / "gentle-fused", submodels=["unet"])
    qdq = "qdq{calib=2 steps=2 held_out=1}"
    optimize_path(work["src"], qdq, d / "q", submodels=["unet"])
    optimize_path(d / "gentle-fused", qdq, d / "fq", submodels=["unet"])
    for k in ("q", "fq", "gentle-fused"):
        lower(d / k, "ort", d / f"{k}-ort", submodels=["unet"], cache=False)
    res = refit(d / "q-ort", [(str(lora), 1.0)], d / "q-refit")
    assert res.submodels["unet"]["matched"] == 44
    ref = load_artifact(d / "gentle-fused-ort").runner("unet")
    cos = {}
    for k in ("q-refit", "fq-ort", "q-ort"):
        run = load_artifact(d / k).runner("unet")
        cos[k] = min(_cos(run(_feeds(run, s))["out_sample"], ref(_feeds(ref, s))["out_sample"]) for s in (7, 8))
    assert cos["q-ort"] < cos["fq-ort"] - 0.001, cos  # the base INT8 UNet is farther from the fused one
    assert cos["q-refit"] >= cos["fq-ort"] - 0.002, cos
    refit(d / "q-refit", [], d / "q-removed", remove=True)
    assert (d / "q-ort" / "unet" / "model.onnx_data").read_bytes() == (d / "q-removed" / "unet" / "model.onnx_data").read_bytes()


@pytest.mark.slow
def test_ascend_refit_runs_the_recorded_atc(work, tmp_path, monkeypatch):
    """Ascend: the refitted ONNX equals lowering the fused graph; a new .om comes from the same atc command."""
    import os

    from tests.seeds.test_seed_002_ascend import _fake_atc

    bindir, log = _fake_atc(tmp_path)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    d = work["dir"]
    kw = {"submodels": ["unet"], "cache": False, "options": {"tome": "false"}}
    lower(work["src"], "ascend310p", tmp_path / "base", **kw)
    lower(d / "fused", "ascend310p", tmp_path / "fused", **kw)
    first = [json.loads(x) for x in log.read_text().splitlines()]
    res = refit(tmp_path / "base", [(str(work["lora"]), 0.8)], tmp_path / "refit")
    assert res.submodels["unet"]["tensors"] == 44
    calls = [json.loads(x) for x in log.read_text().splitlines()][len(first):]
    assert [c["args"] for c in calls] == [c["args"] for c in first[: len(calls)]] and calls
    for f in ("model.onnx_data",):
        assert (tmp_path / "refit" / "unet" / f).read_bytes() == (tmp_path / "fused" / "unet" / f).read_bytes()
    entry = json.loads((tmp_path / "refit" / "sdgraph.json").read_text())["submodels"]["unet"]
    assert entry["converted"] and entry["refit"]["atc"][0].startswith("atc --framework=5 --model=model.onnx")
