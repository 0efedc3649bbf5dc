"""Legit external data everywhere it may appear is validated, listed and copied whole on save;
model-folder copies keep links that stay inside and resolve them to plain files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import sdgraph
from sdgraph.errors import InputError
from sdgraph.ir import io
from tests.reliability.support import weights_model

_X = {"x": np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 16)}


def _run(path: Path) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, _X)[0]


@pytest.mark.parametrize("where", ["initializer", "constant", "function", "subgraph"])
@pytest.mark.parametrize("out_name", ["copy.onnx", "folder"])
def test_save_copies_external_data_everywhere(where, out_name, tmp_path):
    src = weights_model(tmp_path / "in", where=where)
    ref = _run(src)
    model = sdgraph.load(src)
    sdgraph.optimize(model, "fold,cse")
    written = model.save(tmp_path / "out" / out_name)
    np.testing.assert_array_equal(_run(written), ref)
    # the output never points back into the input folder: every reference is a file beside it
    proto = onnx.load(str(written), load_external_data=False)
    files = io.external_data_files(proto, written.parent)
    assert all(f.parent == written.parent.resolve() for f in files)
    assert files, "the 2 KiB weight must stay external"
    for f in files:  # and each is complete: loading validates offsets, lengths and dims
        assert f.stat().st_size >= 2048
    io.load_proto(written)


def test_external_data_files_lists_functions_and_subgraphs(tmp_path):
    for where in ("function", "subgraph", "sparse"):
        src = weights_model(tmp_path / where, where=where)
        proto = onnx.load(str(src), load_external_data=False)
        assert io.external_data_files(proto, src.parent) == [(src.parent / "w.bin").resolve()]


def test_external_data_files_lists_escaping_references(tmp_path):
    """The list serves output-over-input refusal: it names what a reference points at, even outside."""
    src = weights_model(tmp_path / "m", location="../elsewhere.bin")
    proto = onnx.load(str(src), load_external_data=False)
    assert io.external_data_files(proto, src.parent) == [(tmp_path / "elsewhere.bin").resolve()]


def test_valid_offsets_and_no_length_are_accepted(tmp_path):
    src = weights_model(tmp_path / "m")
    proto = onnx.load(str(src), load_external_data=False)
    t = proto.graph.initializer[0]
    for e in list(t.external_data):
        if e.key == "length":
            t.external_data.remove(e)  # no length: the rest of the file (exactly 2 KiB here)
    src.write_bytes(proto.SerializeToString())
    np.testing.assert_array_equal(_run(src), _run(sdgraph.load(src).save(tmp_path / "o.onnx")))


def test_write_refuses_a_reference_built_in_memory(tmp_path):
    """Saving re-checks references: a proto whose weight points outside its source folder is refused."""
    src = weights_model(tmp_path / "m")
    proto = onnx.load(str(src), load_external_data=False)
    for e in proto.graph.initializer[0].external_data:
        if e.key == "location":
            e.value = "../../x.bin"
    with pytest.raises(InputError, match="outside the model's folder"):
        io.write_proto(proto, tmp_path / "o.onnx", src.parent)


def test_copy_inside_keeps_inner_links_as_files(tmp_path):
    root = tmp_path / "model"
    (root / "tok").mkdir(parents=True)
    (root / "tok" / "vocab.json").write_text('{"a": 1}')
    (root / "tok" / "alias.json").symlink_to("vocab.json")
    (root / "shared").symlink_to("tok", target_is_directory=True)
    (tmp_path / "out").mkdir()
    io.copy_inside(root / "tok", tmp_path / "out" / "tok", root)
    io.copy_inside(root / "shared", tmp_path / "out" / "shared", root)
    for rel in ("tok/vocab.json", "tok/alias.json", "shared/vocab.json"):
        p = tmp_path / "out" / rel
        assert p.is_file() and not p.is_symlink() and p.read_text() == '{"a": 1}'


@pytest.mark.parametrize("kind", ["outside-file", "outside-dir", "loop", "fifo", "socket"])
def test_copy_inside_refuses(kind, tmp_path):
    root = tmp_path / "model"
    root.mkdir()
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "key").write_text("k")
    bad = root / "bad"
    if kind == "outside-file":
        bad.symlink_to(tmp_path / "secret" / "key")
    elif kind == "outside-dir":
        bad.symlink_to(tmp_path / "secret", target_is_directory=True)
    elif kind == "loop":
        bad.mkdir()
        (bad / "up").symlink_to("..", target_is_directory=True)
    elif kind == "fifo":
        os.mkfifo(bad)
    else:
        import socket

        s = socket.socket(socket.AF_UNIX)
        try:
            s.bind(str(bad))
        except OSError as exc:  # some sandboxes forbid binding unix sockets
            pytest.skip(f"cannot bind a unix socket here: {exc}")
        finally:
            s.close()
    with pytest.raises(InputError):
        io.copy_inside(root, tmp_path / "out", root)
