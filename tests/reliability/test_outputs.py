"""Every writer refuses outputs over inputs and existing outputs without --force (exit 2, one line).

Each refused case asserts: the exit code, exactly one ``error:`` line naming the paths, no traceback,
every byte of the workspace (inputs and existing outputs) unchanged, and nothing new left behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from sdgraph.errors import InputError
from sdgraph.ir import runtime
from sdgraph.ir.model import Model
from tests.graphs import mlp_model, save_external
from tests.reliability.support import check_refused, invoke, sdgraph, snapshot, tally


@pytest.fixture()
def ws(tmp_path):
    """a.onnx (data in b.onnx_data), m/model.onnx, a model dir md/, existing outputs, an image, prompts."""
    w = tmp_path / "ws"
    save_external(mlp_model(hidden=256), w / "a.onnx", location="b.onnx_data")
    save_external(mlp_model(hidden=256, seed=1), w / "m" / "model.onnx")
    save_external(mlp_model(hidden=256, seed=2), w / "md" / "unet" / "model.onnx")
    (w / "md" / "tokenizer").mkdir()
    (w / "md" / "tokenizer" / "vocab.json").write_text("{}")
    (w / "existing").mkdir()
    (w / "existing" / "keep.txt").write_text("user data\n")
    (w / "existing.json").write_text('{"mine": true}\n')
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 10, 10)).save(w / "img.png")
    (w / "prompts.txt").write_text("a cat\n")
    (w / "pipe").mkdir()
    (w / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    os.symlink("existing", w / "link")
    return w


# (kind, argv with {ws}, exit code, text the one error line must hold, cwd under ws or None)
REFUSED = [
    ("optimize -o existing non-empty folder", "optimize {ws}/a.onnx -p fold -o {ws}/existing", 2, "use --force", None),
    ("optimize -o existing file", "optimize {ws}/a.onnx -p fold -o {ws}/existing.json", 2, "use --force", None),
    ("optimize -o the input graph", "optimize {ws}/a.onnx -p fold -o {ws}/a.onnx --force", 2, "overwrite the input", None),
    ("optimize -o an input's external data", "optimize {ws}/a.onnx -p fold -o {ws}/b.onnx_data --force", 2,
     "overwrite the input", None),
    ("optimize -o the folder holding the input", "optimize {ws}/m/model.onnx -p fold -o {ws}/m --force", 2,
     "overwrite the input", None),
    ("optimize -o . in the input's folder", "optimize a.onnx -p fold -o . --force", 2, "overwrite the input", "."),
    ("optimize model dir into a folder inside itself", "optimize {ws}/md -p fold -o {ws}/md/opt --force", 2,
     "lies inside the input folder", None),
    ("optimize --report over the input", "optimize {ws}/a.onnx -p fold -o {ws}/out --report {ws}/a.onnx --force", 2,
     "overwrite the input", None),
    ("optimize --report over an existing file", "optimize {ws}/a.onnx -p fold -o {ws}/out --report {ws}/existing.json",
     2, "use --force", None),
    ("optimize --dump-dir holding the input", "optimize {ws}/m/model.onnx -p fold -o {ws}/out --dump-dir {ws}/m --force",
     2, "overwrite the input", None),
    ("optimize --dump-dir non-empty", "optimize {ws}/a.onnx -p fold -o {ws}/out --dump-dir {ws}/existing", 2,
     "use --force", None),
    ("optimize -o symlink to a non-empty folder", "optimize {ws}/a.onnx -p fold -o {ws}/link", 2, "use --force", None),
    ("lower -o existing non-empty folder", "lower {ws}/a.onnx -t ort -o {ws}/existing --no-cache", 2, "use --force", None),
    ("lower -o the folder holding the input", "lower {ws}/a.onnx -t ort -o {ws} --force --no-cache", 2,
     "overwrite the input", None),
    ("lower model dir into itself", "lower {ws}/md -t ort -o {ws}/md/ort --force --no-cache", 2,
     "lies inside the input folder", None),
    ("export -o inside the source pipeline", "export {ws}/pipe -o {ws}/pipe/onnx --force", 2,
     "lies inside the input folder", None),
    ("export -o existing non-empty folder", "export {ws}/pipe -o {ws}/existing", 2, "use --force", None),
    ("demo-model -o existing non-empty folder", "demo-model -o {ws}/existing", 2, "not empty", None),
    ("run --image x -o x", "run {ws}/md --prompt cat --image {ws}/img.png -o {ws}/img.png --force", 2,
     "overwrite the input", None),
    ("run -o inside the model folder", "run {ws}/md --prompt cat -o {ws}/md/cat.png", 2, "lies inside the input folder", None),
    ("run -o over the prompt file", "run {ws}/md --prompt-file {ws}/prompts.txt -o {ws}/prompts.txt --force", 2,
     "overwrite the input", None),
    ("run -o existing non-empty folder", "run {ws}/md --prompt cat -o {ws}/existing", 2, "use --force", None),
    ("bench --json-out inside a benched dir", "bench {ws}/md --json-out {ws}/md/bench.json", 2, "lies inside the input folder", None),
    ("bench --json-out over an existing file", "bench {ws}/md --json-out {ws}/existing.json", 2, "use --force", None),
    ("bench --plot onto a benched dir", "bench {ws}/md --plot {ws}/md --force", 2, "overwrite the input", None),
    ("verify -o holding the inputs", "verify {ws}/m/model.onnx {ws}/m/model.onnx -o {ws}/m --force", 2,
     "overwrite the input", None),
    ("verify -o existing non-empty folder", "verify {ws}/a.onnx {ws}/a.onnx -o {ws}/existing", 2, "use --force", None),
    ("demo -o existing non-empty folder", "demo -o {ws}/existing", 2, "use --force", None),
    ("demo --from into its own source", "demo --from {ws}/pipe -o {ws}/pipe/demo --force", 2,
     "lies inside the input folder", None),
]


@pytest.mark.parametrize("kind,argv,code,match,cwd", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_before_any_work(ws, kind, argv, code, match, cwd):
    before = snapshot(ws)
    res = invoke(*argv.format(ws=ws).split(), cwd=ws if cwd else None)
    check_refused(kind, res, code, match, before, snapshot(ws))


def _y(path) -> np.ndarray:
    return runtime.run(Model.load(path), seed=3)["y"]


def test_output_beside_input_whose_data_has_the_outputs_data_name(ws):
    """a.onnx keeps its weights in b.onnx_data; writing b.onnx must not touch that file."""
    before = snapshot(ws)
    res = sdgraph("optimize", ws / "a.onnx", "-p", "fold", "-o", ws / "b.onnx")
    assert res.returncode == 0, res.stderr
    after = snapshot(ws)
    assert {k: v for k, v in after.items() if k in before} == before  # every input byte unchanged
    new = sorted(set(after) - set(before))
    assert len(new) == 2 and new[1] == "b.onnx" and new[0].startswith("b.") and new[0].endswith(".onnx_data"), new
    np.testing.assert_array_equal(_y(ws / "b.onnx"), _y(ws / "a.onnx"))
    # replacing it (--force) swaps in a new data file and removes the one it replaced, never b.onnx_data
    res = sdgraph("optimize", ws / "m" / "model.onnx", "-p", "fold", "-o", ws / "b.onnx", "--force")
    assert res.returncode == 0, res.stderr
    after2 = snapshot(ws)
    assert {k: v for k, v in after2.items() if k in before} == before
    new2 = sorted(set(after2) - set(before))
    assert len(new2) == 2 and new2[0] != new[0], (new, new2)
    np.testing.assert_array_equal(_y(ws / "b.onnx"), _y(ws / "m" / "model.onnx"))
    tally("optimize -o b.onnx beside a.onnx whose data is b.onnx_data")


def test_force_through_a_symlink_writes_the_target_and_leaves_no_stray_link(ws):
    before = snapshot(ws)
    res = sdgraph("optimize", ws / "a.onnx", "-p", "fold", "-o", ws / "link", "--force")
    assert res.returncode == 0, res.stderr
    after = snapshot(ws)
    assert os.readlink(ws / "link") == "existing"  # the link is still the same link
    assert sorted(p.name for p in (ws / "existing").iterdir()) == ["model.onnx", "model.onnx_data"]
    assert not [k for k in after if Path(k).name.startswith(".")], after  # no .link.old-* / temp leftovers
    assert {k: v for k, v in after.items() if not k.startswith("existing")} == \
        {k: v for k, v in before.items() if not k.startswith("existing")}
    tally("optimize -o symlink --force")


def test_force_replaces_a_folder_in_one_commit(ws):
    res = sdgraph("lower", ws / "a.onnx", "-t", "ort", "-o", ws / "existing", "--force", "--no-cache")
    assert res.returncode == 0, res.stderr
    assert not (ws / "existing" / "keep.txt").exists() and (ws / "existing" / "sdgraph.json").is_file()
    assert not [p for p in ws.iterdir() if p.name.startswith(".")]
    tally("lower -o existing --force")


def test_python_api_save_guards_and_forces(ws):
    m = Model.load(ws / "a.onnx")
    before = snapshot(ws)
    problems = []
    for out, force, match in ((ws / "a.onnx", True, "overwrite the input"), (ws / "b.onnx_data", True, "overwrite the input"),
                              (ws, True, "overwrite the input"), (ws / "existing", False, "use --force"),
                              (ws / "existing.json", False, "use --force")):
        with pytest.raises(InputError, match=match):
            m.save(out, force=force)
        problems.append(snapshot(ws) != before)
    tally("Model.save over inputs / existing outputs", input_modified=any(problems))
    assert not any(problems)
    m.save(ws / "existing", force=True)
    assert sorted(p.name for p in (ws / "existing").iterdir()) == ["model.onnx", "model.onnx_data"]


def test_cache_prune_and_clear_touch_only_cache_entries(ws, tmp_path):
    cache = tmp_path / "cache"
    res = sdgraph("lower", ws / "a.onnx", "-t", "ort", "-o", tmp_path / "art", SDGRAPH_CACHE_DIR=str(cache))
    assert res.returncode == 0, res.stderr
    (cache / "notes.txt").write_text("mine\n")
    (cache / "ort" / "unrelated").mkdir()
    (cache / "ort" / "unrelated" / "x.bin").write_bytes(b"1")
    art = snapshot(tmp_path / "art")
    for args in (["--prune", "0"], ["--clear"]):
        res = sdgraph("cache", *args, "--cache-dir", cache)
        assert res.returncode == 0, res.stderr
    assert (cache / "notes.txt").read_text() == "mine\n" and (cache / "ort" / "unrelated" / "x.bin").is_file()
    assert not list(cache.glob("ort/*/entry.json"))
    assert snapshot(tmp_path / "art") == art  # the artifact is a copy: clearing the cache leaves it whole
    tally("cache --prune/--clear")
