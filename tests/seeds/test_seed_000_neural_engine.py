"""Seed 000 (Intel Extension for Transformers, Neural Engine) replayed through the CLI on tiny models:
export (prepare_model.py) -> Neural Engine IR in fp32, bf16 and fp32 + dynamic int8 (export_model.sh) ->
txt2img and InstructPix2Pix img2img on the engine (run_executor.py), latency and accuracy modes.

Where the engine's runtime loads (an AVX-512 Xeon with .venv-ne), the pipeline runs on it; everywhere
the IR is also read back by tests/targets/ne_reference.py and compared with ONNX Runtime per submodel.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from sdgraph.cli import app
from sdgraph.ir.model import Model
from sdgraph.ir.runtime import compare, run, seeded_inputs
from sdgraph.targets.neural_engine import neural_engine_status
from tests.targets import ne_reference

pytestmark = pytest.mark.slow

PRECISIONS = {"fp32": "fp32_ir", "bf16": "bf16_ir", "dynamic_int8": "fp32_dynamic_int8_ir"}
# per precision: the worst max-relative error and cosine the IR may show against ONNX Runtime
BOUNDS = {"fp32": (1e-4, 0.99999), "bf16": (0.05, 0.999), "dynamic_int8": (0.15, 0.99)}


def _cli(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return " ".join(res.output.split())  # the console wraps long lines


def _types(ir_dir) -> dict[str, int]:
    ops = yaml.safe_load((ir_dir / "conf.yaml").read_text())["model"]["operator"]
    out: dict[str, int] = {}
    for op in ops.values():
        out[op["type"]] = out.get(op["type"], 0) + 1
    return out


def _check_ir(model_dir, ir_root, precision, subs):
    """Every submodel's IR, read with the engine's operator semantics, against the ONNX export."""
    for sub in subs:
        m = Model.load(model_dir / sub / "model.onnx")
        feeds = seeded_inputs(m, 0)
        want = run(m, feeds)
        got = ne_reference.run(ir_root / sub, feeds)
        name = next(iter(got))
        rep = compare({name: want[name]}, {name: got[name]})[name]
        max_rel, cos = BOUNDS[precision]
        assert rep["max_rel"] <= max_rel and rep["cosine"] >= cos, (precision, sub, rep)


def test_seed_000_neural_engine(tiny_pipeline, tmp_path):
    ok, why = neural_engine_status()
    # 1.1 prepare_model.py: the three (here four, with the VAE encoder for img2img) ONNX submodels
    _cli("export", tiny_pipeline("sd15"), "-o", tmp_path / "model")
    _cli("export", tiny_pipeline("pix2pix"), "-o", tmp_path / "pix2pix")
    subs = ("text_encoder", "unet", "vae_decoder")

    # 1.2 export_model.sh --precision fp32 | bf16 | fp32 --cast_type=dynamic_int8
    for precision, ir in PRECISIONS.items():
        out = _cli("lower", tmp_path / "model", "--target", "neural-engine", "--precision", precision,
                   "--submodels", ",".join(subs), "-o", tmp_path / ir)
        man = json.loads((tmp_path / ir / "sdgraph.json").read_text())
        assert man["precision"] == precision and set(man["submodels"]) == set(subs), out
        for sub in subs:
            types = _types(tmp_path / ir / sub)
            convs_ips = types.get("Convolution", 0) + types.get("InnerProduct", 0)
            if precision == "fp32":
                assert "Quantize" not in types
            else:  # bf16: one bf16 Quantize per weighted op; dynamic int8: one run-time Quantize per int8 op
                assert 0 < types["Quantize"] <= convs_ips
        _check_ir(tmp_path / "model", tmp_path / ir, precision, subs)
    sizes = {p: (tmp_path / ir / "unet" / "model.bin").stat().st_size for p, ir in PRECISIONS.items()}
    assert sizes["dynamic_int8"] < sizes["bf16"] < sizes["fp32"]

    # 4.2 InstructPix2Pix (8-channel UNet) with its VAE encoder, in bf16 as the card runs it
    _cli("lower", tmp_path / "pix2pix", "--target", "neural-engine", "--precision", "bf16", "-o", tmp_path / "p2p_ir")
    p2p_subs = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
    assert set(json.loads((tmp_path / "p2p_ir" / "sdgraph.json").read_text())["submodels"]) == set(p2p_subs)
    assert "Pad" not in _types(tmp_path / "p2p_ir" / "vae_encoder")
    _check_ir(tmp_path / "pix2pix", tmp_path / "p2p_ir", "bf16", p2p_subs)

    if not ok:
        pytest.skip(f"IR checked with the reference reader; the engine itself does not run here: {why}")
    # 4.1 txt2img on the engine, each IR (run prints s/image: the latency mode); 3. accuracy mode = verify
    prompt = "a photo of an astronaut riding a horse on mars"
    images = {}
    for precision, ir in PRECISIONS.items():
        out = _cli("run", tmp_path / ir, "-p", prompt, "--steps", 2, "--seed", 1, "-o", tmp_path / f"{ir}.png")
        assert "on neural-engine" in out
        images[precision] = np.asarray(Image.open(tmp_path / f"{ir}.png"), dtype=np.int16)
    _cli("run", tmp_path / "model", "-p", prompt, "--steps", 2, "--seed", 1, "-o", tmp_path / "ort.png")
    ref = np.asarray(Image.open(tmp_path / "ort.png"), dtype=np.int16)
    assert np.abs(images["fp32"] - ref).max() <= 8  # the engine's fp32 kernels, not ONNX Runtime's
    assert all(img.shape == ref.shape for img in images.values())
    out = _cli("verify", tmp_path / "model", tmp_path / "bf16_ir", "--steps", 1, "--prompt", prompt,
               "-o", tmp_path / "accuracy")
    v = json.loads((tmp_path / "accuracy" / "verify.json").read_text())
    assert v["summary"]["cosine_min"] >= 0.99 and v["summary"]["psnr_min"] > 20
    # 4.2 on the engine: "Cartoonize the following image"
    Image.fromarray(ref.astype(np.uint8)).save(tmp_path / "mountain.png")
    out = _cli("run", tmp_path / "p2p_ir", "-p", "Cartoonize the following image", "--image", tmp_path / "mountain.png",
               "--steps", 2, "-o", tmp_path / "cartoonized.png")
    assert "on neural-engine" in out and Image.open(tmp_path / "cartoonized.png").size == (128, 128)
