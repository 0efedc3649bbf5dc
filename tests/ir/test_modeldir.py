"""ModelDir on folders built in tmp_path: detection, order, variants, selection, assets, the writer."""

from __future__ import annotations

import json
import os

import pytest

from sdgraph.errors import InputError, UsageError
from sdgraph.ir.model import ROLES
from sdgraph.ir.modeldir import GRAPH, SUBMODELS, ModelDir
from sdgraph.manifest import read_manifest


def make(root, *subs, manifest=None, assets=("tokenizer/vocab.json", "scheduler/scheduler_config.json", "model_index.json")):
    root.mkdir(parents=True, exist_ok=True)
    for s in subs:
        (root / s).mkdir()
        (root / s / GRAPH).write_bytes(b"graph " + s.encode())
        (root / s / "config.json").write_text("{}")
    for a in assets:
        (root / a).parent.mkdir(parents=True, exist_ok=True)
        (root / a).write_text(a)
    if manifest is not None:
        (root / "sdgraph.json").write_text(json.dumps(manifest))
    return root


def test_submodels_are_the_roles_of_ir_model():
    assert set(SUBMODELS) == set(ROLES) and len(SUBMODELS) == len(ROLES)
    assert SUBMODELS.index("text_encoder") < SUBMODELS.index("controlnet") < SUBMODELS.index("unet") < SUBMODELS.index("vae_decoder")


def test_detection(tmp_path):
    assert ModelDir.is_model_dir(make(tmp_path / "sd", "unet"))
    assert not ModelDir.is_model_dir(make(tmp_path / "empty"))
    half = make(tmp_path / "half")
    (half / "unet").mkdir()  # a folder without its graph is not a submodel
    assert not ModelDir.is_model_dir(half)
    own = make(tmp_path / "own", "unet")
    (own / GRAPH).write_bytes(b"x")  # a folder holding model.onnx itself is one model, not a model dir
    assert not ModelDir.is_model_dir(own)
    assert not ModelDir.is_model_dir(tmp_path / "sd" / "unet" / GRAPH)
    assert not ModelDir.is_model_dir(tmp_path / "missing")
    # only the roles count for detection: variants alone do not make a model dir
    assert not ModelDir.is_model_dir(make(tmp_path / "var", "unet_shallow", manifest={"variants": {"unet_shallow": {"of": "unet"}}}))


def test_open_refuses_what_is_not_a_model_dir(tmp_path):
    assert ModelDir.open(make(tmp_path / "sd", "unet")).path == tmp_path / "sd"
    with pytest.raises(InputError, match="not a model directory"):
        ModelDir.open(make(tmp_path / "empty"))
    with pytest.raises(InputError, match="no such file or directory"):
        ModelDir.open(tmp_path / "missing")


def test_submodels_in_pipeline_order(tmp_path):
    d = ModelDir(make(tmp_path / "sd", "vae_decoder", "unet", "text_encoder"))
    assert d.submodels == ["text_encoder", "unet", "vae_decoder"]
    assert d.model_path("unet") == tmp_path / "sd" / "unet" / GRAPH
    assert d.names == list(SUBMODELS)


def test_variants_follow_their_submodel(tmp_path):
    variants = {"unet_shallow": {"of": "unet", "pass": "deepcache{interval=3}"}, "unet_deep": {"of": "unet"},
                "vae_tiny": {"of": "vae_decoder"}}
    d = ModelDir(make(tmp_path / "sd", "unet", "unet_deep", "unet_shallow", "vae_decoder", "vae_tiny",
                      manifest={"variants": variants}))
    assert d.variants == {"unet_shallow": "unet", "unet_deep": "unet", "vae_tiny": "vae_decoder"}
    assert d.variants_of("unet") == ["unet_deep", "unet_shallow"]
    assert d.submodels == ["unet", "unet_deep", "unet_shallow", "vae_decoder", "vae_tiny"]
    assert d.roles == ["unet", "vae_decoder"]
    assert d.select(["vae_decoder", "unet"]) == ["unet", "vae_decoder"]
    with pytest.raises(UsageError, match=r"has no submodel 'unet_deep' \(has unet, vae_decoder\)"):
        d.select(["unet_deep"])  # --submodels picks roles; a variant goes with its role
    assert [p.name for p in d.assets()] == ["model_index.json", "scheduler", "tokenizer"]


def test_a_named_variant_without_its_graph_is_not_present(tmp_path):
    d = ModelDir(make(tmp_path / "sd", "unet", manifest={"variants": {"unet_shallow": {"of": "unet"}}}))
    assert d.names.index("unet_shallow") == d.names.index("unet") + 1
    assert d.submodels == ["unet"]


@pytest.mark.parametrize("bad, match", [
    (["unet_shallow"], 'manifest "variants" must be an object'),
    ({"unet_shallow": "unet"}, 'must be an object with "of"'),
    ({"../escape": {"of": "unet"}}, "is not a folder name of its own"),
    ({".hidden": {"of": "unet"}}, "is not a folder name of its own"),
    ({"unet": {"of": "unet"}}, "is not a folder name of its own"),
])
def test_bad_variants_are_refused_with_one_line(tmp_path, bad, match):
    d = ModelDir(make(tmp_path / "sd", "unet", manifest={"variants": bad}))
    with pytest.raises(InputError, match=match):
        _ = d.submodels


def test_select_keeps_todays_error_text(tmp_path):
    root = make(tmp_path / "sd", "text_encoder", "unet")
    d = ModelDir(root)
    assert d.select(None) == d.select([]) == ["text_encoder", "unet"]
    assert d.select([" unet", "text_encoder "]) == ["text_encoder", "unet"]
    with pytest.raises(UsageError) as e:
        d.select(["unet", "vae_decoder", "vae"])
    assert str(e.value) == f"--submodels: {root} has no submodel 'vae_decoder', 'vae' (has text_encoder, unet)"
    with pytest.raises(UsageError, match=r"^--only: "):
        d.select(["x"], option="--only")


def test_assets_are_everything_but_present_submodels_and_the_manifest(tmp_path):
    root = make(tmp_path / "sd", "unet", manifest={"kind": "model"})
    (root / "vae_encoder").mkdir()  # a role folder without a graph is copied like any other file
    (root / "vae_encoder" / "config.json").write_text("{}")
    assert [p.name for p in ModelDir(root).assets()] == ["model_index.json", "scheduler", "tokenizer", "vae_encoder"]


def test_copy_assets_to(tmp_path):
    root = make(tmp_path / "sd", "unet", manifest={})
    dst = tmp_path / "out"
    dst.mkdir()
    copied = ModelDir(root).copy_assets_to(dst)
    assert sorted(p.name for p in copied) == sorted(p.name for p in dst.iterdir()) == ["model_index.json", "scheduler", "tokenizer"]
    assert (dst / "tokenizer" / "vocab.json").read_text() == "tokenizer/vocab.json"


def test_copy_assets_refuses_a_link_out_of_the_folder(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    root = make(tmp_path / "sd", "unet")
    os.symlink(secret, root / "tokenizer" / "merges.txt")
    dst = tmp_path / "out"
    dst.mkdir()
    with pytest.raises(InputError, match="outside the model folder"):
        ModelDir(root).copy_assets_to(dst)


def test_manifest_read_once_and_written(tmp_path):
    root = make(tmp_path / "sd", "unet", manifest={"kind": "model", "variants": {}})
    d = ModelDir(root)
    assert d.manifest["kind"] == "model"
    d.write_manifest({"kind": "other"})
    assert read_manifest(root) == {"kind": "other"} and d.manifest == {"kind": "other"}
    (root / "sdgraph.json").write_text("[1]")
    with pytest.raises(InputError, match="manifest must be a JSON object"):
        _ = ModelDir(root).manifest


def test_create_commits_once_on_success(tmp_path):
    src = ModelDir(make(tmp_path / "sd", "unet", manifest={"kind": "model"}))
    out = tmp_path / "new"
    with ModelDir.create(out, inputs=[src.path]) as new:
        assert new.path != out and new.path.parent == tmp_path and not out.exists()
        src.copy_assets_to(new.path)
        (new.path / "unet").mkdir()
        (new.path / "unet" / GRAPH).write_bytes(b"g")
        new.write_manifest({"kind": "model", "passes": []})
    made = ModelDir.open(out)
    assert made.submodels == ["unet"] and made.manifest == {"kind": "model", "passes": []}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "sd"]  # no temporary left beside it


def test_create_leaves_nothing_when_the_body_fails(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with ModelDir.create(out) as new:
            (new.path / "unet").mkdir()
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_create_guards_inputs_and_existing_outputs(tmp_path):
    root = make(tmp_path / "sd", "unet")
    with pytest.raises(InputError, match="lies inside the input folder"):
        with ModelDir.create(root / "out", inputs=[root]):
            pass
    with pytest.raises(InputError, match="folder is not empty"):
        with ModelDir.create(root):
            pass
    assert ModelDir.open(root).submodels == ["unet"]  # the existing folder is untouched
    with ModelDir.create(root, force=True) as new:
        (new.path / "vae_decoder").mkdir()
        (new.path / "vae_decoder" / GRAPH).write_bytes(b"g")
    assert ModelDir.open(root).submodels == ["vae_decoder"]


def test_around_a_submodel_graph(tmp_path):
    root = make(tmp_path / "sd", "unet", "unet_shallow", manifest={"variants": {"unet_shallow": {"of": "unet"}}})
    assert ModelDir.around(root / "unet" / GRAPH) == root.resolve()
    assert ModelDir.around(root / "unet_shallow" / GRAPH) == root.resolve()
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "unet.onnx").write_bytes(b"g")
    assert ModelDir.around(loose / "unet.onnx") == loose.resolve()
