"""sdgraph run / bench / verify / demo on the tiny exported pipelines (tests/conftest.py fixtures)."""

from __future__ import annotations

import io
import json
import math
import shutil
import time

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdgraph.cli import app
from sdgraph.errors import InputError, UsageError
from sdgraph.pipeline.bench import METRICS, bench, write_json, write_plot
from sdgraph.pipeline.runner import SCHEDULERS, open_pipeline, read_prompts, save_images
from sdgraph.pipeline.verify import check_thresholds, psnr, ssim, verify_dirs

STEPS = 3


def _png(img) -> bytes:
    b = io.BytesIO()
    img.save(b, format="PNG")
    return b.getvalue()


@pytest.fixture(scope="module")
def sd15(tiny_onnx):
    return tiny_onnx("sd15")


@pytest.fixture(scope="module")
def artifacts(sd15, tmp_path_factory):
    from sdgraph.targets import lower

    root = tmp_path_factory.mktemp("artifacts")
    out = {"ort": lower(sd15, "ort", root / "ort").out}
    try:
        out["openvino"] = lower(sd15, "openvino", root / "openvino").out
    except Exception as exc:  # noqa: BLE001 - only a missing OpenVINO is acceptable here
        from sdgraph.errors import TargetUnavailable

        assert isinstance(exc, TargetUnavailable), exc
    return out


@pytest.fixture(scope="module")
def tome_dir(sd15, tmp_path_factory):
    from sdgraph.passes.manager import optimize_path

    d = tmp_path_factory.mktemp("tome") / "model-tome"
    optimize_path(sd15, "fold,tome", d)
    return d


# ----------------------------------------------------------------------------- run
def test_txt2img_size_and_same_seed_same_bytes(sd15):
    pipe = open_pipeline(sd15)
    a = pipe.generate("a red bicycle", steps=STEPS, seed=3)
    b = pipe.generate("a red bicycle", steps=STEPS, seed=3)
    c = pipe.generate("a red bicycle", steps=STEPS, seed=4)
    assert a.images[0].size == (128, 128)
    assert _png(a.images[0]) == _png(b.images[0])
    assert _png(a.images[0]) != _png(c.images[0])
    assert a.stats["unet"]["calls"] == 2 * a.steps_run  # static batch 1: uncond + cond per step


# Tests on the lowered artifacts (ORT and an OpenVINO compile, ~15 s) and on a ToMe dir are slow.
@pytest.mark.slow
@pytest.mark.parametrize("target", ["ort", "openvino"])
def test_artifacts_txt2img_and_img2img(artifacts, sd15, target):
    if target not in artifacts:
        pytest.skip("OpenVINO is not installed here")
    pipe = open_pipeline(artifacts[target])
    assert pipe.kind == "artifact" and pipe.target == target
    t = pipe.generate("a red bicycle", steps=STEPS, seed=1)
    assert t.images[0].size == (128, 128)
    again = pipe.generate("a red bicycle", steps=STEPS, seed=1)
    assert _png(t.images[0]) == _png(again.images[0])
    init = Image.new("RGB", (100, 60), (200, 30, 30))
    g = pipe.generate("a red bicycle", steps=4, seed=1, image=init, strength=0.5)
    assert g.images[0].size == (128, 128)
    assert any("resized to 128x128" in n for n in g.notes)
    assert 0 < g.steps_run < 5
    # the same numbers as the exported model on ONNX Runtime
    ref = open_pipeline(sd15).generate("a red bicycle", steps=STEPS, seed=1)
    assert psnr(ref.images[0], t.images[0]) > 35


def test_schedulers_and_devices(sd15):
    pipe = open_pipeline(sd15)
    for name in SCHEDULERS:
        assert pipe.generate("a cat", steps=2, seed=0, scheduler=name).images[0].size == (128, 128)
    with pytest.raises(UsageError, match="unknown scheduler"):
        pipe.generate("a cat", steps=2, scheduler="plms2")
    one = pipe.generate("a cat", steps=STEPS, seed=0, scheduler="euler").images[0]
    pipe2 = open_pipeline(sd15, devices=2)
    assert len(pipe2.instances["unet"]) == 2
    two = pipe2.generate("a cat", steps=STEPS, seed=0, scheduler="euler")
    assert np.abs(np.asarray(one, float) - np.asarray(two.images[0], float)).max() <= 2


@pytest.mark.slow
def test_pix2pix_and_turbo_paths(tiny_onnx):
    p2p = open_pipeline(tiny_onnx("pix2pix"))
    assert p2p.is_pix2pix
    with pytest.raises(UsageError, match="InstructPix2Pix"):
        p2p.generate("turn it blue", steps=2)
    g = p2p.generate("turn it blue", steps=2, seed=0, image=Image.new("RGB", (128, 128), (0, 90, 200)))
    assert g.images[0].size == (128, 128)
    assert g.stats["unet"]["calls"] == 3 * g.steps_run  # text, image and unconditional guidance
    xl = open_pipeline(tiny_onnx("sdxl"))
    assert xl.is_xl
    t = xl.generate("a cat", steps=1, guidance=0.0, seed=0, scheduler="euler-a")
    assert t.images[0].size == (128, 128) and t.steps_run == 1
    assert t.stats["unet"]["calls"] == 1 and t.stats["text_encoder_2"]["calls"] == 1


@pytest.mark.slow
def test_bad_inputs(sd15, tmp_path, artifacts):
    pipe = open_pipeline(sd15)
    with pytest.raises(UsageError, match="steps x strength must be >= 1"):
        pipe.generate("x", steps=2, strength=0.3, image=Image.new("RGB", (128, 128)))
    with pytest.raises(UsageError, match="multiples of 8"):
        pipe.generate("x", steps=2, height=100, width=128)
    with pytest.raises(UsageError, match="outside the declared shape buckets"):
        pipe.generate("x", steps=2, height=256, width=256)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(InputError, match="prompt file is empty"):
        read_prompts(None, empty)
    with pytest.raises(InputError, match="unreadable"):
        read_prompts(None, tmp_path / "missing.txt")
    assert read_prompts(None, _write(tmp_path / "p.txt", "a\n\nb\n")) == ["a", "b"]
    old = tmp_path / "old-artifact"
    shutil.copytree(artifacts["ort"], old)
    m = json.loads((old / "sdgraph.json").read_text())
    m["sdgraph_version"] = "0.0.1"
    (old / "sdgraph.json").write_text(json.dumps(m))
    with pytest.raises(InputError, match="built by sdgraph 0.0.1"):
        open_pipeline(old)
    with pytest.raises(InputError, match="not 'openvino'"):
        open_pipeline(artifacts["ort"], target="openvino")


def _write(p, text):
    p.write_text(text)
    return p


def test_cli_run_and_errors(sd15, tmp_path):
    r = CliRunner()
    res = r.invoke(app, ["run", str(sd15), "--prompt", "a cat", "--steps", "2", "-n", "2", "--grid", "-o", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["grid.png", "image_000.png", "image_001.png"]
    assert Image.open(tmp_path / "o" / "grid.png").size == (256, 128)
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (9, 9, 9)).save(init)
    res = r.invoke(app, ["run", str(sd15), "--prompt", "a cat", "--steps", "2", "--image", str(init),
                         "--strength", "0.5", "-o", str(tmp_path / "i2i.png")])
    assert res.exit_code == 0, res.output
    assert Image.open(tmp_path / "i2i.png").size == (128, 128)
    (tmp_path / "empty.txt").write_text("")
    for args, needle in (
        (["--prompt-file", str(tmp_path / "empty.txt")], "prompt file is empty"),
        (["--prompt", "x", "--steps", "3", "--image", str(init), "--strength", "0.2"], "steps x strength"),
        (["--prompt", "x", "--height", "130"], "multiples of 8"),
    ):
        res = r.invoke(app, ["run", str(sd15), *args, "-o", str(tmp_path / "bad.png")])
        assert res.exit_code == 2, res.output
        assert needle in res.output and "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) <= 2


# ----------------------------------------------------------------------------- bench
@pytest.mark.slow
def test_bench_json_has_every_metric(sd15, artifacts, tmp_path):
    rep = bench([sd15, artifacts["ort"]], steps=2, repeats=1)
    assert len(rep["results"]) == 2
    for r in rep["results"]:
        for k in METRICS:
            assert k in r, k
        assert r["e2e_s"] > 0 and r["unet_its"] > 0 and r["peak_rss_mb"] > 0
        assert set(r["submodel_ms"]) >= {"text_encoder", "unet", "vae_decoder"}
        assert r["warmup_compile_s"] >= r["load_s"]
    assert rep["results"][0]["ratios"]["e2e_speedup"] == 1.0
    j = write_json(rep, tmp_path / "b.json")
    assert json.loads(j.read_text())["results"][1]["target"] == "ort"
    pytest.importorskip("matplotlib")
    png = write_plot(rep, tmp_path / "b.png")
    assert Image.open(png).size[0] > 500


@pytest.mark.slow
def test_openvino_artifact_does_not_need_its_source_dir(sd15, tmp_path):
    """Input shapes come from the artifact: a static batch-1 UNet gets the CFG halves one by one."""
    pytest.importorskip("openvino")
    from sdgraph.targets import lower

    src = tmp_path / "src"
    shutil.copytree(sd15, src)
    art = lower(src, "openvino", tmp_path / "ov", cache=False).out
    shutil.rmtree(src)  # e.g. an optimized dir removed after lowering
    pipe = open_pipeline(art)
    assert pipe.unet.input_shapes["sample"][0] == 1 and pipe.unet.input_dtypes["timestep"] == np.float32
    g = pipe.generate("a cat", steps=1, seed=0)
    assert g.images[0].size == (128, 128) and g.stats["unet"]["calls"] == 2


@pytest.mark.slow
def test_bench_keeps_the_other_dirs_when_one_fails(sd15, artifacts, tmp_path, monkeypatch):
    """A dir that fails mid-image (an OpenVINO infer error, say) is reported; the others keep their numbers."""
    from sdgraph.pipeline import bench as bench_mod

    real = bench_mod._bench_one

    def flaky(path, **kw):
        if str(path) == str(artifacts["ort"]):
            raise RuntimeError("Exception from src/inference/src/cpp/infer_request.cpp:224")
        return real(path, **kw)

    monkeypatch.setattr(bench_mod, "_bench_one", flaky)
    rep = bench([sd15, artifacts["ort"], sd15], steps=1, repeats=1)
    assert rep["failed"] == [str(artifacts["ort"])]
    assert "infer_request.cpp:224" in rep["results"][1]["error"]
    assert rep["results"][0]["e2e_s"] > 0 and rep["results"][2]["ratios"]["e2e_speedup"] > 0
    assert json.loads(write_json(rep, tmp_path / "b.json").read_text())["failed"] == [str(artifacts["ort"])]
    from sdgraph.cli.run import bench_table

    assert len(bench_table(rep)[0].rows) == 3
    res = CliRunner().invoke(app, ["bench", str(sd15), str(artifacts["ort"]), "--steps", "1", "--repeats", "1",
                                   "--json-out", str(tmp_path / "c.json")])
    assert res.exit_code == 1 and "1 of 2 dir(s) failed" in res.output
    assert json.loads((tmp_path / "c.json").read_text())["results"][0]["e2e_s"] > 0


# ----------------------------------------------------------------------------- verify
def test_psnr_ssim_numbers():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (48, 40, 3)).astype(np.uint8)
    assert psnr(a, a) == math.inf and ssim(a, a) == pytest.approx(1.0)
    b = np.clip(a.astype(int) + 2, 0, 255).astype(np.uint8)
    mse = np.mean((a.astype(float) - b) ** 2)
    assert psnr(a, b) == pytest.approx(10 * math.log10(255 ** 2 / mse))
    noisy = np.clip(a + rng.normal(0, 40, a.shape), 0, 255).astype(np.uint8)
    assert 0.0 < ssim(a, noisy) < ssim(a, b) < 1.0
    with pytest.raises(InputError):
        psnr(a, a[:10])


@pytest.mark.slow
def test_verify_self_inf_and_tome_finite(sd15, tome_dir, tmp_path):
    same = verify_dirs(sd15, sd15, tmp_path / "v", prompts=("a cat",), seeds=(0,), steps=STEPS)
    assert same["images"][0]["psnr"] == math.inf and same["images"][0]["max_pixel_diff"] == 0
    assert all(s["worst"]["max_abs"] == 0 for s in same["submodels"].values())
    assert (tmp_path / "v" / "verify_sheet.png").is_file()
    assert any("CLIP score: skipped" in n for n in same["notes"])
    tome = verify_dirs(sd15, tome_dir, None, prompts=("a cat",), seeds=(0, 1), steps=STEPS)
    assert len(tome["images"]) == 2
    assert all(math.isfinite(m["psnr"]) for m in tome["images"])
    assert 0 < tome["submodels"]["unet"]["worst"]["max_abs"] and tome["submodels"]["unet"]["worst"]["cosine"] < 1.0
    assert check_thresholds(tome, min_psnr=1000.0) and not check_thresholds(tome, min_psnr=1.0)


def test_bench_warmup_steps_and_images_out(sd15, monkeypatch, tmp_path):
    from sdgraph.pipeline import runner

    steps_seen: list[int] = []
    real = runner.Pipeline.generate

    def counting(self, prompt, **kw):
        steps_seen.append(kw["steps"])
        return real(self, prompt, **kw)

    monkeypatch.setattr(runner.Pipeline, "generate", counting)
    rep = bench([sd15, sd15], steps=3, repeats=2, warmup_steps=1, images_out=tmp_path / "imgs")
    assert steps_seen == [1, 1, 3, 3] * 2 and rep["warmup_steps"] == 1 and rep["steps"] == 3
    assert rep["results"][0]["e2e_s"] > 0
    # --images-out: each dir's last timed image, the same prompt and seed (same dir: the same bytes)
    a, b = (Image.open(r["image"]) for r in rep["results"])
    assert [r["image"] for r in rep["results"]] == [str(tmp_path / "imgs" / f"image_00{i}.png") for i in (0, 1)]
    assert a.size == (128, 128) and psnr(a, b) == math.inf
    with pytest.raises(Exception, match="exists|not empty|--force"):
        bench([sd15], steps=1, repeats=1, images_out=tmp_path / "imgs")
    res = CliRunner().invoke(app, ["bench", str(sd15), "--warmup-steps", "0"])
    assert res.exit_code == 2 and "--warmup-steps" in res.output


def test_bench_time_limit_stops_a_slow_timed_image_after_a_step(sd15, monkeypatch):
    """time_limit_s (tune --cap): the timed image stops at the first step past the limit; warm-ups are not limited."""
    from sdgraph.pipeline import runner

    images: list[list[int]] = []  # the denoising steps each generate call ran
    real = runner.Pipeline.generate

    def slow_steps(self, prompt, **kw):
        cb = kw.pop("callback", None)
        images.append([])

        def each_step(i):
            images[-1].append(i)
            time.sleep(0.1)  # every step takes at least 100 ms
            if cb:
                cb(i)

        return real(self, prompt, callback=each_step, **kw)

    monkeypatch.setattr(runner.Pipeline, "generate", slow_steps)
    rep = bench([sd15, sd15], steps=6, repeats=1, warmup_steps=3, time_limit_s=0.25)
    warm, full = list(range(len(images[0]))), 7  # PNDM: steps + 1 timesteps
    assert len(images) == 6 and len(warm) == 4
    for d in range(2):  # each dir: two whole warm-ups, then the timed image stopped after 1-3 of its 7 steps
        assert images[3 * d] == warm and images[3 * d + 1] == warm
        assert images[3 * d + 2] == list(range(len(images[3 * d + 2]))) and 1 <= len(images[3 * d + 2]) <= 3 < full
    for r in rep["results"]:
        assert r["error"].startswith("stopped: a timed image ran") and 0.25 < r["stopped_s"] < 2.0
        assert r["time_limit_s"] == 0.25 and "e2e_s" not in r
    assert rep["failed"] == [str(sd15)] * 2  # a result, not an exception: tune reads it
    images.clear()
    rep = bench([sd15], steps=6, repeats=1, warmup_steps=1, time_limit_s=60)
    assert [len(i) for i in images] == [1, 1, full] and rep["results"][0]["e2e_s"] > 0.7  # under the limit: whole


@pytest.mark.slow
def test_cli_verify_files_and_threshold(sd15, tome_dir, tmp_path):
    r = CliRunner()
    res = r.invoke(app, ["verify", str(sd15 / "unet" / "model.onnx"), str(tome_dir / "unet" / "model.onnx")])
    assert res.exit_code == 0, res.output
    assert "out_sample" in res.output and "cosine" in res.output
    res = r.invoke(app, ["verify", str(sd15 / "unet" / "model.onnx"), str(tome_dir / "unet" / "model.onnx"),
                         "--min-cosine", "0.999999999"])
    assert res.exit_code == 1 and "verify failed: cosine" in res.output
    res = r.invoke(app, ["verify", str(sd15), str(sd15 / "unet" / "model.onnx")])
    assert res.exit_code == 2
    res = r.invoke(app, ["verify", str(sd15), str(sd15), "--steps", "2", "--prompt", "a cat", "-o", str(tmp_path / "v"),
                         "--min-psnr", "60", "--clip-model", str(tmp_path / "no-clip")])
    assert res.exit_code == 2 and "CLIP model folder not found" in res.output


def test_clip_score_with_local_tiny_clip(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from sdgraph.demo import make_clip_tokenizer
    from sdgraph.pipeline.verify import clip_score

    cfg = CLIPConfig(text_config=dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                      num_hidden_layers=1, projection_dim=16),
                     vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1,
                                        image_size=32, patch_size=8, projection_dim=16), projection_dim=16)
    d = tmp_path / "clip"
    CLIPModel(cfg).save_pretrained(d)
    make_clip_tokenizer(1000, d)
    imgs = [Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))]
    s = clip_score(imgs, ["a red square", "a blue square"], d)
    assert math.isfinite(s) and 0.0 <= s <= 100.0


def test_save_images_layouts(tmp_path):
    imgs = [Image.new("RGB", (16, 8), (i * 40, 0, 0)) for i in range(3)]
    assert [p.name for p in save_images(imgs[:1], tmp_path / "one.png")] == ["one.png"]
    names = [p.name for p in save_images(imgs, tmp_path / "many.png", grid=True)]
    assert names == ["many_000.png", "many_001.png", "many_002.png", "many_grid.png"]
    assert Image.open(tmp_path / "many_grid.png").size == (32, 16)


# ----------------------------------------------------------------------------- the main job
@pytest.mark.slow
def test_demo_main_job_end_to_end(tiny_sd15_pipeline, tmp_path, monkeypatch):
    from sdgraph.pipeline.main_job import optimize_pipelines
    from sdgraph.targets.base import targets

    if "openvino" in targets():  # a missing dependency is skipped with its reason, not silently
        monkeypatch.setattr(targets()["openvino"], "available", lambda self: (False, "not installed (test)"))
    from sdgraph import progress

    r, rec = CliRunner(), progress.Recorder()
    with progress.using(rec):
        res = r.invoke(app, ["demo", "-o", str(tmp_path / "d"), "--steps", "1", "--repeats", "1",
                             "--from", str(tiny_sd15_pipeline)])
    out = tmp_path / "d"
    rep = json.loads((out / "demo.json").read_text())
    assert res.exit_code == (1 if rep["failed"] else 0), res.output
    assert all("FAILED" in f for f in rep["failed"])
    assert any("openvino" in s and "not installed (test)" in s for s in rep["skipped"])
    assert rep["pipelines"] == optimize_pipelines() and rep["pipelines"]["opt"].startswith("fold")
    assert Image.open(out / "image.png").size == (128, 128)
    bench_json = json.loads((out / "bench.json").read_text())
    assert len(bench_json["results"]) == 1 + len(rep["artifacts"]) >= 3
    assert (out / "bench.png").is_file() or "plot" in " ".join(rep["skipped"])
    assert rep["verify"]["ort-fp32"]["images"][0]["psnr"] == math.inf
    assert (out / "verify-ort-fp32" / "verify_sheet.png").is_file()
    assert "bench: 1 steps" in res.output and "verify ort-opt" in res.output
    (demo,) = rec.named("demo")  # one advance per stage called; the bar ends full
    assert demo.advances == demo.total == len(rep["stages"]) + len(rep["failed"]) + sum(
        "openvino" not in s for s in rep["skipped"])
    assert len(rec.named("denoising")) >= 3 and rec.named("bench")[0].total == len(bench_json["results"])
