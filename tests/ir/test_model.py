"""Model load/save: external data stays on disk, saves are atomic, bad files are refused."""

from __future__ import annotations

import os

import re

import numpy as np
import onnx
import pytest

from sdgraph.errors import InputError
from sdgraph.ir import io, runtime
from sdgraph.ir.model import ExternalValues, Model, detect_role
from tests.graphs import mlp_model, save_external


def test_external_weights_stay_on_disk_and_roundtrip(tmp_path):
    src = save_external(mlp_model(hidden=256), tmp_path / "in" / "model.onnx")
    before = {p.name: p.read_bytes() for p in src.parent.iterdir()}
    m = Model.load(src)
    consts = {t.name: t for t in m.graph.tensors().values() if hasattr(t, "_values")}
    assert isinstance(consts["w1"]._values, ExternalValues)  # 16x256 fp32 = 16 KiB: external
    assert not isinstance(consts["shape_c"]._values, ExternalValues)  # 16 bytes: inlined on load
    out = m.save(tmp_path / "out")
    assert out == tmp_path / "out" / "model.onnx"
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx_data"]
    # The graph message holds no weight bytes; the data file holds both matrices.
    assert out.stat().st_size < 2048
    assert (out.parent / "model.onnx_data").stat().st_size >= (16 * 256 * 2) * 4
    ref = runtime.run(Model.load(src), seed=1)
    got = runtime.run(Model.load(out), seed=1)
    np.testing.assert_array_equal(ref["y"], got["y"])
    assert {p.name: p.read_bytes() for p in src.parent.iterdir()} == before  # input untouched


def test_external_values_load_lazily(tmp_path):
    src = save_external(mlp_model(hidden=128, seed=3), tmp_path / "m.onnx")
    m = Model.load(src)
    w1 = next(t for t in m.graph.tensors().values() if t.name == "w1")
    expected = np.random.default_rng(3).standard_normal((16, 128)).astype(np.float32)
    np.testing.assert_array_equal(w1.values, expected)


def test_ir_version_14_is_lowered_for_onnxruntime(tmp_path):
    proto = mlp_model(ir_version=14)
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    out = Model.load(path).save(tmp_path / "o.onnx")
    assert onnx.load(str(out)).ir_version <= io.MAX_IR_VERSION
    assert "y" in runtime.run(Model.load(out))


def test_save_to_file_path_writes_data_beside_it(tmp_path):
    src = save_external(mlp_model(hidden=256), tmp_path / "in" / "model.onnx")
    out = Model.load(src).save(tmp_path / "x" / "small.onnx")
    data = [p for p in (tmp_path / "x").iterdir() if p.name.endswith(".onnx_data")]
    # a uniquely-named data file (small.<8 hex>.onnx_data) that the graph names: one rename commits both
    assert len(data) == 1 and re.fullmatch(r"small\.[0-9a-f]{8}\.onnx_data", data[0].name), data
    assert {e.value for t in onnx.load(str(out), load_external_data=False).graph.initializer
            for e in t.external_data if e.key == "location"} == {data[0].name}
    assert not [p for p in (tmp_path / "x").iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_failed_save_leaves_no_partial_output(tmp_path, monkeypatch):
    src = save_external(mlp_model(hidden=256), tmp_path / "in" / "model.onnx")
    m = Model.load(src)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(io, "write_proto", boom)
    with pytest.raises(RuntimeError):
        m.save(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "in"] == []


@pytest.mark.parametrize("location", ["../evil.bin", "/etc/passwd", "sub/../../evil.bin"])
def test_external_data_outside_model_folder_is_rejected(tmp_path, location):
    d = tmp_path / "model"
    path = save_external(mlp_model(hidden=256), d / "model.onnx")
    proto = onnx.load(str(path), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(proto, str(path))
    (tmp_path / "evil.bin").write_bytes(b"\0" * 100000)
    with pytest.raises(InputError, match="outside the model's folder"):
        Model.load(path)


def test_symlink_escaping_model_folder_is_rejected(tmp_path):
    d = tmp_path / "model"
    path = save_external(mlp_model(hidden=256), d / "model.onnx", location="w.bin")
    (tmp_path / "real.bin").write_bytes((d / "w.bin").read_bytes())
    (d / "w.bin").unlink()
    os.symlink(tmp_path / "real.bin", d / "w.bin")
    with pytest.raises(InputError, match="outside the model's folder"):
        Model.load(path)


def test_missing_and_truncated_external_data(tmp_path):
    path = save_external(mlp_model(hidden=256), tmp_path / "a" / "model.onnx")
    data = path.parent / "model.onnx_data"
    blob = data.read_bytes()
    data.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InputError, match="truncated"):
        Model.load(path)
    data.unlink()
    with pytest.raises(InputError, match="missing"):
        Model.load(path)


@pytest.mark.parametrize("content,match", [
    (b"hello, I am not a model\n" * 10, "cannot be parsed as ONNX"),
    (b"", "empty file"),
])
def test_not_onnx(tmp_path, content, match):
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    with pytest.raises(InputError, match=match):
        Model.load(p)


def test_truncated_onnx(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(mlp_model(), str(p))
    blob = p.read_bytes()
    p.write_bytes(blob[: len(blob) // 3])
    with pytest.raises(InputError, match="cannot be parsed|empty"):
        Model.load(p)


def test_empty_graph(tmp_path):
    g = onnx.helper.make_graph([], "empty", [], [])
    p = tmp_path / "e.onnx"
    onnx.save(onnx.helper.make_model(g), str(p))
    with pytest.raises(InputError, match="empty"):
        Model.load(p)


def test_output_over_input_is_refused(tmp_path):
    path = save_external(mlp_model(hidden=256), tmp_path / "d" / "model.onnx")
    m = Model.load(path)
    for out in (path, path.parent, tmp_path):
        with pytest.raises(InputError, match="overwrite the input"):
            m.save(out)


def _io_graph(inputs, outputs):
    from onnx import TensorProto, helper

    ins = [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs]
    nodes = [helper.make_node("Identity", [inputs[0][0]], [outputs[0][0]])] if inputs[0][1] == TensorProto.FLOAT else [
        helper.make_node("Cast", [inputs[0][0]], [outputs[0][0]], to=TensorProto.FLOAT)]
    nodes += [helper.make_node("Identity", [outputs[0][0]], [n]) for n, _ in outputs[1:]]
    return Model.from_proto(helper.make_model(helper.make_graph(nodes, "g", ins, outs)))


@pytest.mark.parametrize("inputs,outputs,role", [
    ([("sample", 1, [2, 4, 8, 8]), ("timestep", 1, [1]), ("encoder_hidden_states", 1, [2, 77, 32])], [("out_sample", [2, 4, 8, 8])], "unet"),
    ([("input_ids", 7, [1, 77])], [("last_hidden_state", [1, 77, 32]), ("pooler_output", [1, 32])], "text_encoder"),
    ([("latent_sample", 1, [1, 4, 8, 8])], [("sample", [1, 3, 64, 64])], "vae_decoder"),
    ([("sample", 1, [1, 3, 64, 64])], [("latent_sample", [1, 4, 8, 8])], "vae_encoder"),
    ([("x", 1, [1, 4, 8, 8])], [("y", [1, 3, 64, 64])], "vae_decoder"),
    ([("x", 1, [1, 3])], [("y", [1, 3])], "unknown"),
])
def test_role_detection(inputs, outputs, role):
    assert detect_role(_io_graph(inputs, outputs).graph) == role


def test_reading_external_values_then_saving(tmp_path):
    src = save_external(mlp_model(hidden=256, seed=5), tmp_path / "in" / "model.onnx")
    m = Model.load(src)
    w1 = next(t for t in m.graph.tensors().values() if t.name == "w1")
    w1.values = w1.values * 2.0  # a pass that reads and rewrites an on-disk weight
    out = m.save(tmp_path / "out")
    w1_saved = onnx.numpy_helper.to_array(
        next(t for t in onnx.load(str(out)).graph.initializer if t.name == "w1"))
    expected = np.random.default_rng(5).standard_normal((16, 256)).astype(np.float32) * 2.0
    np.testing.assert_array_equal(w1_saved, expected)
