"""tools/bench_tome.py on the tiny UNet: the harness behind the README's ToMe figures runs and reports.

The speed-ups of a tiny UNet mean nothing; these tests check what the full-size run relies on: one
row per engine and ratio, variants built in child processes, cosines against the no-ToMe graph, the
fused ORT graphs fully fused, and the profile split by op type.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Each test runs the tool in child processes that build and export a UNet: 20-35 s of CPU each.
pytestmark = pytest.mark.slow

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_tome.py"


def _run(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(TOOL), "--size", "tiny", "--px", "64", "--repeat", "1",
                           "--work", str(tmp_path / "work"), "--json", str(out), *args],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("fuse", [False, True], ids=["exported", "fused"])
def test_rows_per_engine_and_ratio(tmp_path, fuse):
    flags = ["--fuse"] if fuse else []
    report = _run(tmp_path, "--batch", "2", "--ratios", "0.3,0.6", "--engines", "ort,ov", *flags)
    rows = report["rows"]
    ort_engine = "ort fused" if fuse else "ort"
    assert [(r["engine"], r["variant"]) for r in rows] == [
        (ort_engine, "tome{ratio=0.3}"), (ort_engine, "tome{ratio=0.6}"), ("ov", "tome{ratio=0.3}"), ("ov", "tome{ratio=0.6}")]
    for r in rows:
        assert r["blocks"] >= 1
        assert 0.9 < r["cosine"] < 1.0  # approximate, but close: merging changed the output
        assert r["seconds"] > 0 and r["base_seconds"] > 0
    # same graph change on both engines: same approximation
    assert rows[0]["cosine"] == pytest.approx(rows[2]["cosine"], abs=1e-5)
    assert rows[1]["cosine"] < rows[0]["cosine"]  # merging more tokens moves the output further
    if fuse:
        for r in rows[:2]:
            for name, counts in r["fused"].items():
                matched, expected = counts.split("/")
                assert matched == expected, (name, counts)
    else:
        assert not list((tmp_path / "work").glob("*_fused_*"))


def test_tome_options_reach_the_pass(tmp_path):
    plain = _run(tmp_path, "--batch", "1", "--ratios", "0.5", "--engines", "ort")["rows"][0]
    mlp = _run(tmp_path, "--batch", "1", "--ratios", "0.5", "--engines", "ort", "--tome-options", "mlp=true")["rows"][0]
    assert mlp["variant"] == "tome{ratio=0.5 mlp=true}"
    assert mlp["cosine"] != pytest.approx(plain["cosine"], abs=1e-7)


def test_profile_splits_time_by_op_type(tmp_path):
    times = _run(tmp_path, "--batch", "1", "--fuse", "--profile", "0.5")
    base, tome = times["no ToMe"], times["tome 0.5"]
    assert base["MultiHeadAttention"] > 0 and tome["MultiHeadAttention"] > 0
    assert "TopK" in tome and "TopK" not in base  # the merge's best-destination search
    assert not list((tmp_path / "work").glob("*_fused_*"))  # fused variants removed after profiling
