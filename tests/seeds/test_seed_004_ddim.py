"""Seed 004 (Habana Gaudi, latent-diffusion txt2img) replayed through the CLI on the tiny SD1.5 export:
DDIM with steps / eta / scale, n_samples x n_iter samples and their grid, warm-up apart from the timings.

    scripts/txt2img.py --prompt "..." --ddim_eta 0.0 --n_samples 4 --n_iter 4 --scale 5.0 --ddim_steps 50
    -> sdgraph run MODEL --prompt-file PROMPTS --num-images 4 --scheduler ddim --eta 0.0 --guidance 5.0 --steps 50 --grid
"""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdgraph.cli import app
from sdgraph.pipeline.runner import open_pipeline

pytestmark = pytest.mark.slow

PROMPT = "a virus monster is playing guitar, oil on canvas"


def _cli(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res


def _arr(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_seed_004_ddim_grid_and_warmup(tiny_sd15_onnx, tmp_path):
    model = tiny_sd15_onnx
    # 1. the card's command: 4 samples of one prompt, DDIM, eta 0, scale 5 -> 4 PNGs and a 2x2 grid
    res = _cli("run", model, "--prompt", PROMPT, "--scheduler", "ddim", "--eta", 0.0, "--num-images", 4,
               "--guidance", 5.0, "--steps", 4, "--grid", "-o", tmp_path / "samples")
    assert res.exit_code == 0, res.output
    assert "4 image(s) 128x128" in res.output
    samples = [_arr(tmp_path / "samples" / f"image_{i:03d}.png") for i in range(4)]
    grid = _arr(tmp_path / "samples" / "grid.png")
    assert grid.shape == (256, 256, 3)
    for i, s in enumerate(samples):  # row-major tiles, each the sample itself
        r, c = divmod(i, 2)
        assert np.array_equal(grid[r * 128:(r + 1) * 128, c * 128:(c + 1) * 128], s)
    assert len({s.tobytes() for s in samples}) == 4  # seeds seed..seed+3: four different samples

    # 2. n_iter x n_samples over several prompts: one grid of all of them
    (tmp_path / "prompts.txt").write_text(f"{PROMPT}\na red bicycle in front of a castle, watercolor\n")
    res = _cli("run", model, "--prompt-file", tmp_path / "prompts.txt", "--scheduler", "ddim", "--num-images", 2,
               "--guidance", 5.0, "--steps", 2, "--grid", "-o", tmp_path / "two" / "out.png")
    assert res.exit_code == 0 and "4 image(s)" in res.output, res.output
    assert Image.open(tmp_path / "two" / "out_grid.png").size == (256, 256)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "out_000.png", "out_001.png", "out_002.png", "out_003.png", "out_grid.png"]

    # 3. DDIM steps / eta / scale: deterministic at eta 0, stochastic (seeded) at eta 1, steps = UNet calls
    pipe = open_pipeline(model)
    kw = dict(scheduler="ddim", guidance=5.0, seed=3)
    a, b = pipe.generate(PROMPT, steps=5, eta=0.0, **kw), pipe.generate(PROMPT, steps=5, eta=0.0, **kw)
    assert a.steps_run == 5 and len(a.timesteps) == 5 and a.stats["unet"]["calls"] == 10  # cond + uncond
    assert a.timesteps == [801.0, 601.0, 401.0, 201.0, 1.0]  # DDIM "leading" spacing with steps_offset 1
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    c = pipe.generate(PROMPT, steps=5, eta=1.0, **kw)
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(c.images[0]))
    assert np.array_equal(np.asarray(c.images[0]), np.asarray(pipe.generate(PROMPT, steps=5, eta=1.0, **kw).images[0]))
    g1 = pipe.generate(PROMPT, steps=2, scheduler="ddim", guidance=1.0, seed=3)  # scale 1: no guidance batch
    assert g1.stats["unet"]["calls"] == 2

    # 4. "the first batches are slow": bench keeps warm-up apart from the timed images
    res = _cli("bench", model, "--scheduler", "ddim", "--steps", 2, "--repeats", 3, "--guidance", 5.0,
               "--json-out", tmp_path / "bench.json")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "bench.json").read_text())
    r = rep["results"][0]
    assert len(r["e2e_s_runs"]) == 3 and r["e2e_s"] == statistics.median(r["e2e_s_runs"])
    assert r["warmup_compile_s"] > r["load_s"] > 0 and r["warmup_cache_s"] > 0
    assert r["timesteps"] == [501.0, 1.0] and r["steps"] == 2
    assert "warm-up with compilation" in " ".join(res.output.split())  # said apart from the timed s/image
