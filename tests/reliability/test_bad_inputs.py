"""Bad input across every command and the Python API (issue 15).

Each case builds its input in code and asserts: the exit code of the README table, exactly one
``error:`` line on stderr, no traceback, the input's bytes unchanged and nothing else written (the
whole work folder and the shared fixtures are hashed before and after).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from onnx import helper, numpy_helper

from tests.reliability.support import (
    invoke, png_bomb, save, tiny_graph, tree_state, weights_model,
)


class Ctx:
    """What a case may use: a work folder, a tiny model file, the tiny SD1.5 export (lazily)."""

    def __init__(self, tmp: Path, request):
        self.tmp = tmp
        self.request = request
        self.shared: list[Path] = []  # session fixtures a case reads: hashed too

    @property
    def sd15(self) -> Path:
        p = self.request.getfixturevalue("tiny_sd15_onnx")
        self.shared.append(p)
        return p

    def sd15_copy(self) -> Path:
        dst = self.tmp / "sd15"
        if not dst.exists():
            shutil.copytree(self.sd15, dst)
        return dst

    def mlp(self) -> Path:
        f = self.tmp / "mlp.onnx"
        if not f.exists():
            from tests.graphs import mlp_model, save_external

            save_external(mlp_model(hidden=32), f)
        return f

    def relu(self, name: str = "relu.onnx", nan: bool = False) -> Path:
        init = [numpy_helper.from_array(np.full((1, 4), np.nan if nan else 0.0, np.float32), "c")]
        return save(tiny_graph([helper.make_node("Add", ["x", "c"], ["a"], name="add"),
                                helper.make_node("Relu", ["a"], ["y"], name="relu")], initializers=init),
                    self.tmp / name)


# (id, exit code, substring of the error line, build(ctx) -> args | (args, options))
CASES: list[tuple[str, int, str, Callable]] = []


def case(cid: str, code: int, match: str):
    def deco(fn):
        CASES.append((cid, code, match, fn))
        return fn
    return deco


# -- external data: validated wherever it appears ---------------------------------------------
for _where in ("initializer", "constant", "function", "subgraph", "sparse"):
    case(f"ext-traversal-{_where}", 2, "outside the model's folder")(
        lambda c, w=_where: ["inspect", weights_model(c.tmp / "m", where=w, location="../secret.bin")])
case("ext-negative-offset", 2, "not a non-negative integer")(
    lambda c: ["inspect", weights_model(c.tmp / "m", offset="-64")])
case("ext-negative-length-in-function", 2, "not a non-negative integer")(
    lambda c: ["optimize", weights_model(c.tmp / "m", where="function", length="-1"), "-p", "fold", "-o", c.tmp / "o"])
case("ext-fractional-offset", 2, "not a non-negative integer")(
    lambda c: ["inspect", weights_model(c.tmp / "m", offset="1.5")])
case("ext-length-vs-dims", 2, "need 2048")(
    lambda c: ["inspect", weights_model(c.tmp / "m", length="512")])
case("ext-length-vs-dims-subgraph", 2, "need 2048")(
    lambda c: ["optimize", weights_model(c.tmp / "m", where="subgraph", length="4096"), "-p", "fold", "-o", c.tmp / "o"])
case("ext-missing-file", 2, "is missing")(
    lambda c: ["inspect", weights_model(c.tmp / "m", location="nothere.bin")])


@case("ext-truncated-file", 2, "truncated")
def _(c):
    f = weights_model(c.tmp / "m", where="constant")
    data = c.tmp / "m" / "w.bin"
    data.write_bytes(data.read_bytes()[:100])
    return ["inspect", f]


@case("ext-data-is-a-fifo", 2, "not a regular file")
def _(c):
    f = weights_model(c.tmp / "m", location="fifo")
    os.mkfifo(c.tmp / "m" / "fifo")
    return ["inspect", f]


@case("ext-data-links-outside", 2, "outside the model's folder")
def _(c):
    f = weights_model(c.tmp / "m")
    (c.tmp / "m" / "w.bin").rename(c.tmp / "outside.bin")
    (c.tmp / "m" / "w.bin").symlink_to(c.tmp / "outside.bin")
    return ["optimize", f, "-p", "fold", "-o", c.tmp / "o"]


# -- graphs that are not graphs ---------------------------------------------------------------
case("not-onnx", 2, "cannot be parsed as ONNX")(
    lambda c: ["inspect", _write(c.tmp / "junk.onnx", b"\x00\xffnot a model" * 50)])


@case("truncated-export", 2, "cannot be parsed as ONNX")
def _(c):
    data = (c.sd15 / "text_encoder" / "model.onnx").read_bytes()
    d = c.tmp / "te"
    d.mkdir()
    shutil.copy(c.sd15 / "text_encoder" / "model.onnx_data", d / "model.onnx_data")
    return ["optimize", _write(d / "model.onnx", data[: len(data) // 2]), "-p", "fold", "-o", c.tmp / "o"]


case("graph-cycle", 2, "cycle")(lambda c: ["optimize", save(tiny_graph([
    helper.make_node("Add", ["x", "b"], ["a"], name="n1"),
    helper.make_node("Relu", ["a"], ["b"], name="n2"),
    helper.make_node("Relu", ["a"], ["y"], name="n3")]), c.tmp / "g.onnx"), "-p", "fold", "-o", c.tmp / "o"])
case("duplicate-node-names", 2, "duplicate node names")(lambda c: ["optimize", save(tiny_graph([
    helper.make_node("Relu", ["x"], ["a"], name="same"),
    helper.make_node("Relu", ["a"], ["y"], name="same")]), c.tmp / "g.onnx"), "-p", "fold,cse", "-o", c.tmp / "o"])
case("two-producers", 2, "more than one producer")(lambda c: ["optimize", save(tiny_graph([
    helper.make_node("Relu", ["x"], ["y"], name="p1"),
    helper.make_node("Sigmoid", ["x"], ["y"], name="p2")]), c.tmp / "g.onnx"), "-p", "fold", "-o", c.tmp / "o"])
case("dangling-input", 2, "nothing produces")(lambda c: ["lower", save(tiny_graph([
    helper.make_node("Add", ["x", "ghost"], ["y"], name="add")]), c.tmp / "g.onnx"), "-t", "ort", "-o", c.tmp / "o"])


# -- model folders: copies never leave the folder ---------------------------------------------
@case("model-dir-link-outside", 2, "outside the model folder")
def _(c):
    d = c.sd15_copy()
    _write(c.tmp / "private.txt", b"secret")
    (d / "tokenizer" / "stolen.txt").symlink_to(c.tmp / "private.txt")
    return ["optimize", d, "-p", "fold", "-o", c.tmp / "o"]


@case("model-dir-fifo", 2, "FIFO")
def _(c):
    d = c.sd15_copy()
    os.mkfifo(d / "scheduler" / "pipe")
    return ["lower", d, "-t", "ort", "-o", c.tmp / "o"]


@case("model-dir-symlink-loop", 2, "symlink loop")
def _(c):
    d = c.sd15_copy()
    (d / "tokenizer" / "again").symlink_to(d / "tokenizer")
    return ["optimize", d, "-p", "fold", "-o", c.tmp / "o"]


@case("model-dir-self-link-loop", 2, "symlink loop")
def _(c):
    d = c.sd15_copy()
    (d / "tokenizer" / "loop").symlink_to("loop")
    return ["lower", d, "-t", "ort", "-o", c.tmp / "o"]


@case("model-dir-dangling-link", 2, "cannot be read")
def _(c):
    d = c.sd15_copy()
    (d / "scheduler" / "gone").symlink_to(c.tmp / "nowhere")
    return ["optimize", d, "-p", "fold", "-o", c.tmp / "o"]


# -- manifests, configs, images, prompts ------------------------------------------------------
@case("manifest-is-a-list", 2, "must be a JSON object")
def _(c):
    d = c.sd15_copy()
    _write(d / "sdgraph.json", b"[1, 2, 3]")
    return ["run", d, "--prompt", "a cat", "--steps", "1", "-o", c.tmp / "o.png"]


@case("scheduler-config-corrupt", 2, "scheduler config")
def _(c):
    d = c.sd15_copy()
    _write(d / "scheduler" / "scheduler_config.json", b'{"_class_name": "DDIMScheduler", "num_train')
    return ["run", d, "--prompt", "a cat", "--steps", "1", "-o", c.tmp / "o.png"]


@case("scheduler-config-nonsense-values", 2, "scheduler config")
def _(c):
    d = c.sd15_copy()
    _write(d / "scheduler" / "scheduler_config.json",
           b'{"_class_name": "DDIMScheduler", "num_train_timesteps": "many", "beta_schedule": "nope"}')
    return ["run", d, "--prompt", "a cat", "--steps", "1", "-o", c.tmp / "o.png"]


case("model-index-is-a-list", 2, "must be a JSON object")(
    lambda c: ["export", _write(c.tmp / "pipe" / "model_index.json", b"[]").parent, "-o", c.tmp / "o"])
case("image-decompression-bomb", 2, "decompression bomb")(
    lambda c: ["run", c.sd15, "--prompt", "a cat", "--steps", "1", "--image", png_bomb(c.tmp / "bomb.png"),
               "-o", c.tmp / "o.png"])
case("image-not-an-image", 2, "not a readable image")(
    lambda c: ["run", c.sd15, "--prompt", "a cat", "--steps", "1", "--image", _write(c.tmp / "x.png", b"GIF89a junk"),
               "-o", c.tmp / "o.png"])
case("prompt-not-utf8", 2, "not valid UTF-8")(
    lambda c: ["run", c.sd15, "--prompt", "a \udcff cat", "--steps", "1", "-o", c.tmp / "o.png"])
case("negative-prompt-not-utf8", 2, "not valid UTF-8")(
    lambda c: ["run", c.sd15, "--prompt", "a cat", "--negative-prompt", "\udce9", "-o", c.tmp / "o.png"])
case("prompt-file-not-utf8", 2, "prompt file is unreadable")(
    lambda c: ["run", c.sd15, "--prompt-file", _write(c.tmp / "p.txt", b"caf\xe9\n"), "-o", c.tmp / "o.png"])
case("prompt-file-is-a-folder", 2, "prompt file is unreadable")(
    lambda c: ["run", c.sd15, "--prompt-file", _mkdir(c.tmp / "pf"), "-o", c.tmp / "o.png"])

# -- numbers: NaN/Inf and bounds --------------------------------------------------------------
_RUN = lambda c, *a: ["run", c.sd15, "--prompt", "a cat", *a, "-o", c.tmp / "o.png"]  # noqa: E731
case("run-steps-huge", 2, "--steps 100000")(lambda c: _RUN(c, "--steps", "100000"))
case("run-steps-zero", 2, "--steps 0")(lambda c: _RUN(c, "--steps", "0"))
case("run-seed-negative", 2, "--seed -1")(lambda c: _RUN(c, "--seed", "-1"))
case("run-seed-too-big", 2, "--seed")(lambda c: _RUN(c, "--seed", str(2**40)))
case("run-guidance-nan", 2, "finite")(lambda c: _RUN(c, "--guidance", "nan"))
case("run-guidance-inf", 2, "finite")(lambda c: _RUN(c, "--guidance", "inf"))
case("run-strength-zero", 2, "--strength")(lambda c: _RUN(c, "--strength", "0"))
case("run-eta-nan", 2, "finite")(lambda c: _RUN(c, "--eta", "nan"))
case("run-height-not-a-multiple", 2, "100x128")(lambda c: _RUN(c, "--height", "100"))
case("run-width-huge", 2, "--width 99999")(lambda c: _RUN(c, "--width", "99999"))
case("run-devices-zero", 2, "--devices 0")(lambda c: _RUN(c, "--devices", "0"))
case("run-num-images-zero", 2, "--num-images 0")(lambda c: _RUN(c, "--num-images", "0"))
case("bench-repeats-zero", 2, "--repeats 0")(lambda c: ["bench", c.sd15, "--repeats", "0"])
case("bench-steps-huge", 2, "--steps")(lambda c: ["bench", c.sd15, "--steps", "5000"])
case("verify-min-cosine-nan", 2, "finite")(
    lambda c: ["verify", c.relu("a.onnx"), c.relu("b.onnx"), "--min-cosine", "nan"])
case("verify-seeds-negative", 2, "--seed -3")(lambda c: ["verify", c.sd15, c.sd15, "--seeds", "0,-3"])
case("optimize-seed-negative", 2, "--seed -1")(
    lambda c: ["optimize", c.mlp(), "-p", "fold", "--verify", "--seed", "-1", "-o", c.tmp / "o"])
case("pass-tome-ratio-nan", 2, "finite")(lambda c: ["optimize", c.mlp(), "-p", "tome{ratio=nan}", "-o", c.tmp / "o"])
case("pass-min-cosine-nan", 2, "finite")(
    lambda c: ["optimize", c.mlp(), "-p", "bf16{min_cosine=nan}", "--verify", "-o", c.tmp / "o"])
case("pass-min-cosine-inf", 2, "finite")(
    lambda c: ["optimize", c.mlp(), "-p", "fp16{min_cosine=-inf}", "-o", c.tmp / "o"])
case("cache-prune-nan", 2, "finite")(lambda c: ["cache", "--prune", "nan", "--cache-dir", c.tmp / "cache"])
case("cache-prune-negative", 2, "--prune -1")(lambda c: ["cache", "--prune", "-1", "--cache-dir", c.tmp / "cache"])
case("cache-max-gb-inf", 2, "SDGRAPH_CACHE_MAX_GB")(
    lambda c: (["cache", "--cache-dir", c.tmp / "cache"], {"env": {"SDGRAPH_CACHE_MAX_GB": "inf"}}))
case("lower-cache-max-gb-nan", 2, "SDGRAPH_CACHE_MAX_GB")(
    lambda c: (["lower", c.mlp(), "-t", "ort", "-o", c.tmp / "o"], {"env": {"SDGRAPH_CACHE_MAX_GB": "nan"}}))
case("tome-estimate-ratio-nan", 2, "finite")(lambda c: ["tome-estimate", c.sd15 / "unet", "--ratio", "nan"])
case("tome-estimate-blocks-negative", 2, "--blocks -2")(lambda c: ["tome-estimate", c.sd15 / "unet", "--blocks", "-2"])
case("demo-model-seed-negative", 2, "--seed -1")(lambda c: ["demo-model", "-o", c.tmp / "o", "--seed", "-1"])
case("export-batch-zero", 2, "--batch 0")(lambda c: ["export", c.tmp / "nothing", "-o", c.tmp / "o", "--batch", "0"])
case("export-tolerance-nan", 2, "finite")(
    lambda c: ["export", c.tmp / "nothing", "-o", c.tmp / "o", "--tolerance", "nan"])
case("demo-steps-huge", 2, "--steps")(lambda c: ["demo", "-o", c.tmp / "o", "--steps", "100000"])

# -- NaN outputs fail every threshold (exit 1, printed as nan) --------------------------------
case("verify-nan-output-min-cosine", 1, "verify failed")(
    lambda c: ["verify", c.relu("a.onnx"), c.relu("b.onnx", nan=True), "--min-cosine", "0.99"])
case("verify-nan-output-max-abs", 1, "verify failed")(
    lambda c: ["verify", c.relu("a.onnx"), c.relu("b.onnx", nan=True), "--max-abs", "1e9"])

# -- selections that name nothing -------------------------------------------------------------
case("optimize-submodels-nosuch", 2, "has no submodel 'nosuch'")(
    lambda c: ["optimize", c.sd15, "-p", "fold", "--submodels", "nosuch", "-o", c.tmp / "o"])
case("lower-submodels-nosuch", 2, "has no submodel 'nosuch'")(
    lambda c: ["lower", c.sd15, "-t", "ort", "--submodels", "unet,nosuch", "-o", c.tmp / "o"])
case("optimize-submodels-on-a-file", 2, "applies to a model directory")(
    lambda c: ["optimize", c.mlp(), "-p", "fold", "--submodels", "unet", "-o", c.tmp / "o"])
case("optimize-shape-unknown-input", 2, "unknown input 'nope'")(
    lambda c: ["optimize", c.mlp(), "-p", "fold", "--verify", "--shape", "nope=1x16", "-o", c.tmp / "o"])
case("optimize-shape-not-in-selected-submodel", 2, "unknown input 'input_ids'")(
    lambda c: ["optimize", c.sd15, "-p", "fold", "--verify", "--submodels", "unet", "--shape", "input_ids=1x77",
               "-o", c.tmp / "o"])
case("optimize-shape-without-verify", 2, "add --verify")(
    lambda c: ["optimize", c.mlp(), "-p", "fold", "--shape", "x=1x16", "-o", c.tmp / "o"])
case("lower-shape-unknown-input", 2, "unknown input 'nope'")(
    lambda c: ["lower", c.mlp(), "-t", "ort", "--shape", "nope=1x16", "-o", c.tmp / "o"])

# -- outputs that cannot be ---------------------------------------------------------------------
case("output-is-the-current-folder", 2, "current folder")(
    lambda c: (["optimize", c.mlp(), "-p", "fold", "-o", "."], {"cwd": _mkdir(c.tmp / "here")}))
case("output-is-a-parent-of-cwd", 2, "current folder")(
    lambda c: (["lower", c.mlp(), "-t", "ort", "-o", ".."], {"cwd": _mkdir(c.tmp / "a" / "b")}))

# -- usage errors (through the real interpreter) ------------------------------------------------
_SUB = {"subprocess_run": True}
case("usage-missing-argument", 2, "Missing argument")(lambda c: (["optimize"], _SUB))
case("usage-unknown-option", 2, "No such option")(lambda c: (["inspect", c.mlp(), "--bogus"], _SUB))
case("usage-bad-int", 2, "--steps")(lambda c: (["run", c.tmp, "--steps", "many", "-o", c.tmp / "o"], _SUB))
case("usage-bad-float", 2, "--prune")(lambda c: (["cache", "--prune", "lots"], _SUB))
case("usage-unknown-command", 2, "No such command")(lambda c: (["frobnicate"], _SUB))
case("usage-extra-argument", 2, "unexpected extra argument")(lambda c: (["doctor", "extra"], {}))
case("usage-missing-option", 2, "Missing option")(lambda c: ["lower", c.mlp(), "-o", c.tmp / "o"])
case("usage-bad-pipeline-text", 2, "unbalanced")(lambda c: ["optimize", c.mlp(), "-p", "fold{a=1", "-o", c.tmp / "o"])
case("usage-unknown-pass", 2, "nosuchpass")(lambda c: ["optimize", c.mlp(), "-p", "nosuchpass", "-o", c.tmp / "o"])


# -- LoRA files (lora pass, refit) --------------------------------------------------------------
def _lora_file(path: Path, tensors: dict) -> Path:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


case("lora-corrupt-safetensors", 2, "not a valid safetensors file")(
    lambda c: ["optimize", c.sd15 / "unet" / "model.onnx", "-p", f"lora:{_write(c.tmp / 'l' / 'x.safetensors', b'{}garbage')}",
               "-o", c.tmp / "o"])
case("lora-rank-mismatch", 2, "rank mismatch")(
    lambda c: ["optimize", c.sd15 / "unet" / "model.onnx", "-p", "lora:" + str(_lora_file(c.tmp / "l" / "r.safetensors", {
        "unet.conv_in.lora_A.weight": np.ones((4, 4, 3, 3), np.float32),
        "unet.conv_in.lora_B.weight": np.ones((32, 8, 1, 1), np.float32)})), "-o", c.tmp / "o"])
case("lora-other-architecture", 2, "another architecture")(
    lambda c: ["optimize", c.sd15 / "unet" / "model.onnx", "-p", "lora:" + str(_lora_file(c.tmp / "l" / "a.safetensors", {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": np.ones((4, 320), np.float32),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": np.ones((320, 4), np.float32)})),
               "-o", c.tmp / "o"])
case("refit-not-an-artifact", 2, "not an sdgraph artifact")(
    lambda c: ["refit", c.sd15, "--lora", _write(c.tmp / "l" / "x.safetensors", b"x"), "-o", c.tmp / "o"])
case("refit-nothing-to-do", 2, "nothing to do")(lambda c: ["refit", c.sd15, "-o", c.tmp / "o"])


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.parametrize("cid,code,match,build", CASES, ids=[c[0] for c in CASES])
def test_bad_input(cid, code, match, build, tmp_path, request):
    ctx = Ctx(tmp_path, request)
    built = build(ctx)
    args, opts = built if isinstance(built, tuple) else (built, {})
    before = tree_state(tmp_path, *ctx.shared)
    res = invoke(args, **opts)
    after = tree_state(tmp_path, *ctx.shared)
    everything = res.stdout + res.stderr
    assert "Traceback" not in everything, everything
    assert res.code == code, (res.code, res.stderr)
    assert len(res.error_lines) == 1, res.stderr
    assert match.lower() in res.error_lines[0].lower(), res.error_lines[0]
    assert "internal error" not in res.stderr
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert not changed, f"inputs modified or stray output: {sorted(changed)}"
    if cid.startswith("verify-nan-output"):
        assert "nan" in res.stdout  # the table prints the numbers it judged


def test_there_are_enough_kinds():
    assert len({cid for cid, *_ in CASES}) >= 45


# -- the Python API raises sdgraph.errors, never a stray exception ------------------------------
def _relu_file(tmp: Path) -> Path:
    return save(tiny_graph([helper.make_node("Relu", ["x"], ["y"], name="r")]), tmp / "ok.onnx")


def _cycle_file(tmp: Path) -> Path:
    return save(tiny_graph([helper.make_node("Relu", ["b"], ["a"], name="n1"),
                            helper.make_node("Relu", ["a"], ["b"], name="n2"),
                            helper.make_node("Relu", ["a"], ["y"], name="n3")]), tmp / "c.onnx")


def _optimize_in_memory_invalid(_path):
    import sdgraph
    from sdgraph.ir.model import Model

    m = Model.from_proto(tiny_graph([helper.make_node("Relu", ["x"], ["a"], name="dup"),
                                     helper.make_node("Relu", ["a"], ["y"], name="dup")]))
    return sdgraph.optimize(m, "fold")


def _load(p):
    import sdgraph

    return sdgraph.load(p)


def _optimize(text):
    import sdgraph

    return lambda p: sdgraph.optimize(sdgraph.load(p), text)


# (id, error class name, build(tmp) -> path, call(path))
API_CASES = [
    ("load-garbage", "InputError", lambda t: _write(t / "g.onnx", b"garbage" * 9), _load),
    ("load-missing", "InputError", lambda t: t / "nope.onnx", _load),
    ("load-cycle", "InputError", _cycle_file, _load),
    ("load-ext-negative-length", "InputError", lambda t: weights_model(t / "m", length="-4"), _load),
    ("load-ext-function-traversal", "InputError",
     lambda t: weights_model(t / "m", where="function", location="../../etc/passwd"), _load),
    ("load-ext-sparse-length-vs-dims", "InputError", lambda t: weights_model(t / "m", where="sparse", length="8"), _load),
    ("optimize-invalid-in-memory", "InputError", _relu_file, _optimize_in_memory_invalid),
    ("optimize-ratio-nan", "UsageError", _relu_file, _optimize("tome{ratio=nan}")),
    ("optimize-unknown-pass", "UsageError", _relu_file, _optimize("nosuchpass")),
    ("optimize-unknown-option", "UsageError", _relu_file, _optimize("fold{nosuch=1}")),
    ("optimize-empty-pipeline", "UsageError", _relu_file, _optimize("")),
]


@pytest.mark.parametrize("cid,exc,build,call", API_CASES, ids=[c[0] for c in API_CASES])
def test_python_api_bad_input(cid, exc, build, call, tmp_path):
    import sdgraph.errors

    path = build(tmp_path)
    before = tree_state(tmp_path)
    with pytest.raises(getattr(sdgraph.errors, exc)) as info:
        call(path)
    assert "\n" not in str(info.value)
    assert tree_state(tmp_path) == before


def test_generate_refuses_out_of_bounds(tiny_sd15_onnx):
    from sdgraph.errors import UsageError
    from sdgraph.pipeline.runner import open_pipeline

    pipe = open_pipeline(tiny_sd15_onnx)
    for kwargs in ({"steps": 100000}, {"seed": -1}, {"guidance": float("nan")}, {"strength": 2.0},
                   {"eta": float("inf")}):
        with pytest.raises(UsageError):
            pipe.generate("a cat", **kwargs)


def test_disk_full_while_writing_is_bad_input_not_a_crash(tmp_path, monkeypatch):
    """ENOSPC in the middle of a save: exit 2 with one line, no partial output, no temp left."""
    import errno

    from sdgraph.ir import io as sio
    from tests.graphs import mlp_model, save_external

    src = save_external(mlp_model(hidden=32), tmp_path / "in" / "model.onnx")
    real = sio.write_proto

    def full(proto, out_file, *a, **kw):
        Path(out_file).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(out_file))

    monkeypatch.setattr(sio, "write_proto", full)
    before = tree_state(tmp_path)
    res = invoke(["optimize", src, "-p", "fold", "-o", tmp_path / "out"])
    assert res.code == 2 and len(res.error_lines) == 1 and "No space left" in res.error_lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert tree_state(tmp_path) == before
    monkeypatch.setattr(sio, "write_proto", real)


def test_docs_state_the_bounds_and_the_readme_exit_codes():
    """docs/reliability.md carries every bound of sdgraph.limits and the README's exit-code table."""
    from sdgraph.limits import BOUNDS

    root = Path(__file__).resolve().parents[2]
    doc = (root / "docs" / "reliability.md").read_text()
    for name, b in BOUNDS.items():
        assert f"| `{name}` | {b.describe()} |" in doc, name
    readme = (root / "README.md").read_text()
    section = readme.split("Exit codes", 1)[1] if "Exit codes" in readme else ""
    rows = []
    for line in section.splitlines()[1:]:
        if rows and not line.startswith("|"):
            break
        if line.startswith("| ") and line[2:4].strip().isdigit():
            rows.append(line)
    assert all(row in doc for row in rows)  # the README may move its table to the docs site
    from sdgraph.errors import EXIT_CODES

    assert all(f"| {code} |" in doc for code in [*EXIT_CODES, 70])
    assert "runs" in doc and "--fid-model" in doc  # the TorchScript warning


def test_help_still_works_and_warns_about_torchscript():
    res = invoke(["verify", "--help"], env={"COLUMNS": "250"})
    assert res.code == 0 and not res.error_lines
    assert "TorchScript runs code" in " ".join(res.stdout.split())
    top = invoke(["--help"])
    assert top.code == 0 and "optimize" in top.stdout and not top.stderr.strip()


@pytest.mark.parametrize("exact", [True, False])
def test_optimize_verify_fails_on_nan_outputs(exact, tmp_path):
    """A pass whose outputs turn NaN fails --verify (exact or approximate, even with no min_cosine)."""
    import onnx_graphsurgeon as gs

    import sdgraph
    from sdgraph.errors import VerificationError
    from sdgraph.passes.base import Pass, PassResult

    class Poison(Pass):
        name = "poison"

        def run(self, model):
            for t in model.graph.tensors().values():
                if isinstance(t, gs.Constant):
                    t.values = np.full(t.shape, np.nan, np.float32)
            return PassResult(modified=True)

    Poison.exact = exact
    src = save(tiny_graph([helper.make_node("Add", ["x", "c"], ["a"], name="add"),
                           helper.make_node("Relu", ["a"], ["y"], name="relu")],
                          initializers=[numpy_helper.from_array(np.ones((1, 4), np.float32), "c")]), tmp_path / "m.onnx")
    model = sdgraph.load(src)
    with pytest.raises(VerificationError, match="NaN"):
        sdgraph.optimize(model, [Poison()], verify=True)
    assert not np.isnan(next(t for t in model.graph.tensors().values() if t.name == "c").values).any()  # rolled back
