"""The lowering cache never serves a corrupt or stale artifact, and never shares an inode with one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sdgraph.ir.model import Model
from tests.graphs import mlp_model, save_external
from tests.reliability.support import sdgraph, snapshot, tally

# each case lowers through the CLI twice: ~45 s of CPU in all; part of the full suite, not the fast layer.
pytestmark = pytest.mark.slow


@pytest.fixture()
def src(tmp_path):
    return save_external(mlp_model(hidden=256), tmp_path / "in" / "model.onnx")


def _lower(src, out, cache, *extra):
    res = sdgraph("lower", src, "-t", "ort", "-o", out, *extra, SDGRAPH_CACHE_DIR=str(cache))
    assert res.returncode == 0, res.stderr
    return res


def _files(art: Path) -> dict[str, str]:
    """The artifact's files (the manifest holds timings and paths, so it is left out)."""
    return {k: v for k, v in snapshot(art).items() if k != "sdgraph.json"}


def _state(res) -> str:
    return "hit" if "cache hit" in res.stderr else "miss"


def _entry_files(cache: Path) -> list[Path]:
    return [p for p in cache.glob("ort/*/files/**/*") if p.is_file()]


def test_artifacts_are_copies_not_links(tmp_path, src):
    cache = tmp_path / "cache"
    _lower(src, tmp_path / "a1", cache)
    res = _lower(src, tmp_path / "a2", cache)
    assert _state(res) == "hit"
    cached = {(p.stat().st_dev, p.stat().st_ino) for p in _entry_files(cache)}
    for art in (tmp_path / "a1", tmp_path / "a2"):
        for p in (q for q in art.rglob("*") if q.is_file()):
            assert p.stat().st_nlink == 1 and (p.stat().st_dev, p.stat().st_ino) not in cached, p
    # editing an artifact leaves the cache entry intact: the next lower hits and gets the original bytes
    victim = max((q for q in (tmp_path / "a2").rglob("*") if q.is_file()), key=lambda q: q.stat().st_size)
    victim.write_bytes(b"\0" * victim.stat().st_size)
    res = _lower(src, tmp_path / "a3", cache)
    assert _state(res) == "hit"
    assert _files(tmp_path / "a3") == _files(tmp_path / "a1") != _files(tmp_path / "a2")
    tally("cache: edit an artifact file")


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "remove a file", "add a file", "no digests"])
def test_corrupt_entry_is_evicted_rebuilt_and_said(tmp_path, src, damage):
    cache = tmp_path / "cache"
    _lower(src, tmp_path / "a1", cache)
    files = sorted(_entry_files(cache), key=lambda p: p.stat().st_size)
    big = files[-1]
    if damage == "flip a byte":
        data = bytearray(big.read_bytes())
        data[len(data) // 2] ^= 0xFF
        big.write_bytes(bytes(data))
    elif damage == "truncate":
        big.write_bytes(big.read_bytes()[:-8])
    elif damage == "remove a file":
        big.unlink()
    elif damage == "add a file":
        (big.parent / "extra.bin").write_bytes(b"x")
    else:  # an entry written before digests were recorded
        meta = next(cache.glob("ort/*/entry.json"))
        data = json.loads(meta.read_text())
        del data["digests"]
        meta.write_text(json.dumps(data))
    res = _lower(src, tmp_path / "a2", cache)
    warnings = [line for line in res.stderr.splitlines() if line.startswith("WARNING")]
    stale = _state(res) == "hit" or _files(tmp_path / "a2") != _files(tmp_path / "a1")
    tally(f"cache: corrupt entry ({damage})", stale_cache_hit=stale, traceback="Traceback" in res.stderr)
    assert len(warnings) == 1 and "is corrupt" in warnings[0] and "evicted" in warnings[0], res.stderr
    assert not stale
    assert "entry corrupt" in res.stderr
    res = _lower(src, tmp_path / "a3", cache)  # the rebuilt entry serves hits again
    assert _state(res) == "hit" and _files(tmp_path / "a3") == _files(tmp_path / "a1")


def test_same_size_same_mtime_edit_is_a_miss(tmp_path, src):
    """The graph key hashes content: restoring size and mtime after an edit does not fool it."""
    cache = tmp_path / "cache"
    _lower(src, tmp_path / "a1", cache)
    data = src.parent / "model.onnx_data"
    st = data.stat()
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0x01
    data.write_bytes(bytes(raw))
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert data.stat().st_size == st.st_size and data.stat().st_mtime_ns == st.st_mtime_ns
    res = _lower(src, tmp_path / "a2", cache)
    tally("cache: edit keeping size and mtime", stale_cache_hit=_state(res) == "hit")
    assert _state(res) == "miss" and "graph changed" in res.stderr


def test_hash_memo_checks_content(tmp_path, src):
    """A memo whose sampled content no longer matches is not trusted (the full hash is recomputed)."""
    from sdgraph.targets.cache import graph_hash

    files = [src, src.parent / "model.onnx_data"]
    h1 = graph_hash(files, tmp_path / "c")
    (memo,) = (tmp_path / "c" / "hashes").iterdir()
    memo.write_text(json.dumps({"sha256": "0" * 64, "samples": ["bogus", "bogus"]}))
    assert graph_hash(files, tmp_path / "c") == h1
    tally("cache: hash memo with wrong samples", stale_cache_hit=graph_hash(files, tmp_path / "c") != h1)


def test_unwritable_cache_dir_falls_back_with_one_warning(tmp_path, src):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be\n")
    res = sdgraph("lower", src, "-t", "ort", "-o", tmp_path / "a", SDGRAPH_CACHE_DIR=str(blocker / "cache"))
    warnings = [line for line in res.stderr.splitlines() if line.startswith("WARNING")]
    tally("cache: unwritable cache folder", wrong_exit=res.returncode != 0, traceback="Traceback" in res.stderr)
    assert res.returncode == 0, res.stderr
    assert len(warnings) == 1 and "not writable" in warnings[0], res.stderr
    assert (tmp_path / "a" / "sdgraph.json").is_file()
    assert blocker.read_text().startswith("a file")
    Model.load(tmp_path / "a" / "model" / "model.onnx")
