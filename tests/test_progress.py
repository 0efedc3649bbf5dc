"""sdgraph.progress: the one progress abstraction, its reporters, and the long steps that report to it."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from sdgraph import progress
from sdgraph.errors import UsageError


@pytest.fixture
def rec():
    r = progress.Recorder()
    with progress.using(r):
        yield r


def test_null_by_default_and_using_restores():
    assert progress.current() is progress.NULL
    with progress.task("x", total=2) as t:  # the null task takes every call
        t.advance()
        t.update(description="y", total=3, completed=1)
    r = progress.Recorder()
    with progress.using(r):
        assert progress.current() is r
        with progress.using(None):  # None leaves the current one
            assert progress.current() is r
    assert progress.current() is progress.NULL


def test_track_advances_after_each_item_continue_included(rec):
    seen = []
    for i in progress.track(range(5), "items"):
        if i % 2:
            continue
        seen.append(i)
    (t,) = rec.tasks
    assert (t.description, t.total, t.advances, t.completed, t.closed) == ("items", 5, 5, 5, True)
    assert seen == [0, 2, 4]
    for _ in progress.track(iter([1, 2, 3]), "no len"):
        break
    assert rec.tasks[1].total is None and rec.tasks[1].advances == 0 and rec.tasks[1].closed


def test_for_console_modes(monkeypatch):
    class Fake:
        def __init__(self, terminal):
            self.is_terminal = terminal

    monkeypatch.delenv(progress.ENV, raising=False)
    assert isinstance(progress.for_console(Fake(True)), progress.RichReporter)
    assert progress.for_console(Fake(False)) is None  # a pipe or file: no bars
    assert progress.for_console(Fake(True), enabled=False) is None  # -q or --json
    monkeypatch.setenv(progress.ENV, "always")
    assert isinstance(progress.for_console(Fake(False)), progress.RichReporter)
    assert progress.for_console(Fake(False), enabled=False) is None
    monkeypatch.setenv(progress.ENV, "never")
    assert progress.for_console(Fake(True)) is None
    monkeypatch.setenv(progress.ENV, "sometimes")
    with pytest.raises(UsageError, match="SDGRAPH_PROGRESS"):
        progress.for_console(Fake(True))


def test_rich_reporter_prints_final_state_off_a_terminal():
    buf = io.StringIO()
    rich = progress.RichReporter(Console(file=buf, width=100, force_terminal=False))
    with progress.using(rich):
        with progress.task("bench", total=2) as outer:
            for _ in range(2):
                for _ in progress.track(range(3), "denoising"):
                    pass
                outer.advance()
    text = buf.getvalue()
    assert "bench" in text and "2/2" in text
    assert text.count("denoising") == 2 and text.count("3/3") == 2
    assert rich._bar is None  # the live display stopped with the last task


def test_rich_reporter_on_a_terminal_clears_its_bars():
    buf = io.StringIO()
    rich = progress.RichReporter(Console(file=buf, width=100, force_terminal=True))
    with progress.using(rich):
        with progress.task("export", total=1) as t:
            assert len(rich._bar.tasks) == 1
            with progress.task("inner", total=1):
                assert len(rich._bar.tasks) == 2
            assert len(rich._bar.tasks) == 1  # a finished task's bar goes
            t.advance()
    assert rich._bar is None


# -- the long steps ------------------------------------------------------------------------------
def test_denoising_bench_verify_lower_report(tiny_sd15_onnx, tmp_path, rec):
    from sdgraph.pipeline.bench import bench
    from sdgraph.pipeline.runner import open_pipeline
    from sdgraph.pipeline.verify import verify_dirs
    from sdgraph.targets import lower

    open_pipeline(tiny_sd15_onnx).generate("a cat", steps=3, seed=0, scheduler="ddim")  # PNDM runs steps + 1
    (t,) = rec.tasks
    assert (t.description, t.total, t.advances) == ("denoising", 3, 3)

    rec.tasks.clear()
    bench([tiny_sd15_onnx], steps=1, repeats=2, scheduler="ddim")
    b = rec.named("bench")
    assert len(b) == 1 and (b[0].total, b[0].advances) == (1, 1)
    timed = rec.named(f"bench {tiny_sd15_onnx.name}: timed images")
    assert len(timed) == 1 and (timed[0].total, timed[0].advances) == (2, 2)
    den = rec.named("denoising")  # two warm-ups + two timed images
    assert len(den) == 4 and all((d.total, d.advances) == (1, 1) for d in den)

    rec.tasks.clear()
    verify_dirs(tiny_sd15_onnx, tiny_sd15_onnx, prompts=("a cat",), seeds=(0, 1), steps=1, scheduler="ddim")
    subs, imgs = rec.named("verify submodels"), rec.named("verify images")
    assert len(subs) == 1 and subs[0].total == subs[0].advances == 4  # text encoder, UNet, VAE encoder and decoder
    assert len(imgs) == 1 and (imgs[0].total, imgs[0].advances) == (2, 2)
    assert len(rec.named("denoising")) == 4  # reference and candidate, per prompt and seed

    rec.tasks.clear()
    lower(tiny_sd15_onnx, "ort", tmp_path / "ort", submodels=["text_encoder", "vae_decoder"], cache=False)
    (t,) = rec.named("lower ort")
    assert (t.total, t.advances) == (2, 2)


def test_calibration_reports_trajectories_and_ranges(tiny_sd15_onnx, rec):
    from sdgraph.ir.model import Model
    from sdgraph.quant.calibration import calibration_feeds

    unet = Model.load(tiny_sd15_onnx / "unet" / "model.onnx")
    feeds = calibration_feeds(unet, 6, steps=2, use_cache=False)  # 2 UNet calls per step at batch 1: 4 per trajectory
    assert len(feeds) == 6
    (t,) = rec.named("calibration trajectories (unet)")
    assert (t.total, t.advances) == (2, 2)
    assert rec.named("denoising") == []  # calibration runs its own loop, not the image pipeline
