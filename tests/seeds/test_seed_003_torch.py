"""Seed 003 (OneDiff nexfort, torch.compile family) end to end through the CLI on a tiny random-weight SD1.5.

The card's runs: baseline without compilation, compiled (its mode string's parts that torch.compile has
on a CPU: inductor "default"; channels_last memory format), dynamic shape with runs at several
resolutions, and its metrics table: it/s, end-to-end time, peak memory, warm-up with compilation,
warm-up with cache (`sdgraph bench`).
"""

from __future__ import annotations

import json

import pytest

from sdgraph.manifest import read_manifest
from tests.test_cli import sdgraph

pytestmark = pytest.mark.slow
pytest.importorskip("torch")

COLUMNS = ["dir", "s/image", "speedup", "UNet it/s", "UNet MB", "warm-up compile s", "warm-up cache s", "peak RSS MB"]
METRICS = ("e2e_s", "unet_its", "warmup_compile_s", "warmup_cache_s", "load_s")


def _header(stdout: str) -> list[str]:
    line = next(ln for ln in stdout.splitlines() if "s/image" in ln)
    return [c.strip() for c in line.strip().strip("┃│").split("┃" if "┃" in line else "│")]


def test_seed_003_torch_modes_and_multi_resolution(tiny_onnx, tmp_path):
    src = tiny_onnx("sd15", "legacy", dynamic=True)
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    res = sdgraph("lower", src, "--target", "torch", "-o", eager, "--option", "mode=eager")
    assert res.returncode == 0, res.stderr
    # dynamic=true is left out: torch.compile(dynamic=True) of this UNet fails in Inductor here
    # ("LoweringException: ValueRangeError: Invalid ranges [0:-1]"); without it each resolution recompiles
    res = sdgraph("lower", src, "--target", "torch", "-o", compiled, "--option", "mode=default", "--option",
                  "channels_last=true", "--option", "warmup=false")
    assert res.returncode == 0, res.stderr
    opts = read_manifest(compiled)["options"]
    assert opts["mode"] == "default" and opts["channels_last"] is True
    for h, w in ((128, 128), (192, 128)):  # one dynamic export serves every resolution
        js = tmp_path / f"bench_{h}x{w}.json"
        res = sdgraph("bench", src, eager, compiled, "--steps", "2", "--repeats", "1", "--height", h, "--width", w,
                      "--json-out", js)
        assert res.returncode == 0, res.stderr
        assert _header(res.stdout) == COLUMNS, res.stdout
        assert f"2 steps, {h}x{w}" in res.stdout
        report = json.loads(js.read_text())
        assert len(report["results"]) == 3
        for r in report["results"]:
            assert r["height"] == h and r["width"] == w, r
            for k in METRICS:
                assert r[k] > 0, (k, r)
            assert r["peak_rss_mb"] > 0 and r["submodel_ms"]["unet"] > 0
        targets = [r["target"] for r in report["results"]]
        assert targets[1:] == ["torch", "torch"]
