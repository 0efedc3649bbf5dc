"""Disk full: exit 2 with one line (a full disk is the environment, not a bug), nothing partial left."""

from __future__ import annotations

import subprocess

import pytest

from tests.graphs import mlp_model, save_external
from tests.reliability.support import check_refused, invoke, snapshot


@pytest.fixture()
def small_disk(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root and CAP_SYS_ADMIN): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


CASES = [
    ("optimize -o file.onnx", "optimize {src} -p fold -o {mnt}/out.onnx"),
    ("optimize -o folder", "optimize {src} -p fold -o {mnt}/out"),
    ("optimize --dump-dir", "optimize {src} -p fold -o {tmp}/ok --dump-dir {mnt}/dump"),
    ("lower -o folder", "lower {src} -t ort -o {mnt}/art --no-cache"),
]


@pytest.mark.parametrize("kind,argv", CASES, ids=[c[0] for c in CASES])
def test_disk_full_is_one_line_exit_2(tmp_path, small_disk, kind, argv):
    src = save_external(mlp_model(hidden=8192), tmp_path / "in" / "model.onnx")  # 1 MB of weights > 256 KB
    before_in, before_disk = snapshot(tmp_path / "in"), snapshot(small_disk)
    res = invoke(*argv.format(src=src, mnt=small_disk, tmp=tmp_path).split())
    check_refused(f"disk full: {kind}", res, 2, "No space left on device",
                  {**before_in, **{"disk/" + k: v for k, v in before_disk.items()}},
                  {**snapshot(tmp_path / "in"), **{"disk/" + k: v for k, v in snapshot(small_disk).items()}})
