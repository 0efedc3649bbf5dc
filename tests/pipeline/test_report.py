"""``sdgraph report``: the data it collects, the page it renders, and the page in a real browser."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdgraph.pipeline import svg
from sdgraph.pipeline.report import REPORT_SCHEMA, collect, heatmap, render

REPO = Path(__file__).resolve().parents[2]


def sdgraph(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "sdgraph", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env)


def _decode(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


class _Page(HTMLParser):
    """Tags and attributes of a page, for structural checks without a browser."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def find(self, tag, **attrs):
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]


# ----------------------------------------------------------------------------- units
def test_heatmap_marks_exactly_the_differing_pixels():
    ref = np.zeros((8, 8, 3), np.uint8)
    cand = ref.copy()
    cand[2, 5] = (0, 40, 0)
    cand[6, 1] = (10, 0, 0)
    heat, top = heatmap(ref, cand)
    assert top == 40
    assert heat.shape == (8, 8, 3)
    assert tuple(heat[2, 5]) == (252, 255, 164)  # the largest difference is the top of the ramp
    assert tuple(heat[0, 0]) == (0, 0, 4)  # equal pixels are the bottom of the ramp
    assert heat[6, 1].sum() > heat[0, 0].sum()  # a smaller difference is brighter than none
    assert int((heat.reshape(-1, 3) != (0, 0, 4)).any(axis=1).sum()) == 2
    same, top_same = heatmap(ref, ref)
    assert top_same == 1 and (same == (0, 0, 4)).all()


def test_heatmap_refuses_images_of_different_sizes():
    from sdgraph.errors import InputError

    with pytest.raises(InputError, match="differ in size"):
        heatmap(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5, 3), np.uint8))


def test_bar_chart_carries_each_value_and_escapes_labels():
    out = svg.bar_chart(["a<b", "c"], [2.0, 0.5], title="t & u", unit="s", ref=1.0)
    assert out.count("<rect") == 2
    assert 'data-value="2.0"' in out and 'data-value="0.5"' in out
    assert "a&lt;b" in out and "t &amp; u" in out and "a<b" not in out
    assert out.count("<line") == 1


def test_scatter_joins_only_the_front():
    pts = [{"x": 1.0, "y": 30.0, "front": True}, {"x": 2.0, "y": 40.0, "front": True},
           {"x": 3.0, "y": 35.0}, {"x": float("nan"), "y": 1.0}]
    out = svg.scatter_chart(pts, x="x", y="y", title="t", x_label="s", y_label="dB")
    assert out.count("<circle") == 3  # the NaN point is left out
    assert out.count('class="pt front"') == 2
    assert out.count("<polyline") == 1


def test_tune_study_front_and_chosen(tmp_path):
    study = tmp_path / "study"
    study.mkdir()
    (study / "tune.json").write_text(json.dumps({"chosen": 2, "trials": [
        {"number": 0, "config": "ort fold", "s_per_image": 2.0, "psnr": 90.0, "ssim": 1.0, "front": True},
        {"number": 1, "config": "ort tome", "s_per_image": 1.8, "psnr": 40.0, "ssim": 0.99, "front": False},
        {"number": 2, "config": "openvino bf16", "s_per_image": 0.9, "psnr": 45.0, "ssim": 0.995, "front": True},
        {"number": 3, "config": "bad", "error": "lower failed"}]}))
    data = collect([study])
    assert [i["kind"] for i in data["inputs"]] == ["tune"]
    (t,) = data["tunes"]
    assert t["chosen"] == 2 and len(t["trials"]) == 4
    assert t["chart"].count("<circle") == 3 and t["chart"].count('class="pt front"') == 2
    html = render(data)
    assert 'class="chosen"' in html and "lower failed" in html


# ----------------------------------------------------------------------------- on a tiny pipeline
@pytest.fixture(scope="module")
def made(tiny_onnx, tmp_path_factory):
    """optimize (--report) -> verify -o -> bench --json-out on the tiny SD1.5 export, all through the CLI."""
    root = tmp_path_factory.mktemp("report")
    src = tiny_onnx("sd15")
    opt = root / "model-opt"
    r = sdgraph("optimize", src, "--passes", "fold,tome,fa,gn", "-o", opt, "--report", root / "opt.json",
                "--submodels", "unet", "--debug")
    assert r.returncode == 0, r.stderr
    r = sdgraph("verify", src, opt, "-o", root / "verify", "--steps", "2", "--seeds", "0,1", "--prompt", "a red cube")
    assert r.returncode == 0, r.stderr
    r = sdgraph("bench", src, opt, "--steps", "2", "--repeats", "1", "--json-out", root / "bench.json")
    assert r.returncode == 0, r.stderr
    return {"root": root, "src": src, "opt": opt}


@pytest.mark.slow  # the `made` fixture runs optimize, verify and bench: ~45 s of CPU
def test_report_holds_the_numbers_of_its_inputs(made):
    root = made["root"]
    out = root / "report.html"
    r = sdgraph("report", root / "verify", root / "bench.json", root / "opt.json", made["opt"], "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert tuple(data) == REPORT_SCHEMA
    assert [i["kind"] for i in data["inputs"]] == ["verify", "bench", "optimize report", "model dir"]
    html = out.read_text()
    page = _Page(html)
    # no network: nothing loaded from outside the file
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert not page.find("link") and all("src" not in a for a in page.find("script"))
    # images: two seeds, each reference, candidate and heatmap inlined, equal to the files verify wrote
    verify = json.loads((root / "verify" / "verify.json").read_text())
    imgs = [a for t, a in page.tags if t == "img"]
    assert len(imgs) == 3 * len(verify["images"]) == 6
    for i in range(2):
        ref = np.asarray(Image.open(root / "verify" / f"ref_{i:03d}.png").convert("RGB"))
        cand = np.asarray(Image.open(root / "verify" / f"cand_{i:03d}.png").convert("RGB"))
        by_class = {a["class"]: a for a in imgs[3 * i:3 * i + 3]}
        assert (_decode(by_class["ref"]["src"]) == ref).all()
        assert (_decode(by_class["cand"]["src"]) == cand).all()
        assert (_decode(by_class["heatmap"]["src"]) == heatmap(ref, cand)[0]).all()
    assert len(page.find("input", type="range")) == 2
    # the error table: one row per output, the numbers of verify.json
    cells = [a for a in page.find("td") if a.get("data-key") == "cosine"]
    want = [m["cosine"] for s in verify["submodels"].values() for m in s["outputs"].values()]
    assert [float(a["data-value"]) for a in cells] == pytest.approx(want, rel=0, abs=0)
    # the bench table and charts: one row per dir with bench.json's seconds
    bench = json.loads((root / "bench.json").read_text())
    e2e = [float(a["data-value"]) for a in page.find("td") if a.get("data-key") == "e2e_s"]
    assert e2e == [x["e2e_s"] for x in bench["results"]]
    assert html.count('class="chart bar"') == 2
    # the pass reports: the optimize JSON (with op counts) and the model dir's manifest history
    assert len(data["passes"]) == 2
    unet = data["passes"][0]["submodels"]["unet"]
    assert [x["pass"] for x in unet["records"]] == ["fold", "tome", "fa", "gn"]
    opt = json.loads((root / "opt.json").read_text())["unet"]
    assert {o["op"]: o["after"] for o in unet["ops"]} == {k: v for k, v in opt["ops_after"].items()} | {
        k: 0 for k in opt["ops_before"] if k not in opt["ops_after"]}
    assert len(page.find("table", **{"class": "ops", "data-submodel": "unet"})) == 1


@pytest.mark.slow
def test_report_bad_inputs_are_one_line_and_leave_files_alone(made, tmp_path):
    root = made["root"]
    bench = root / "bench.json"
    before = bench.read_bytes()
    cases = [
        (["report", tmp_path / "nosuch"], "no such file"),
        (["report", made["src"] / "unet" / "model.onnx", "-o", tmp_path / "a.html"], "nothing sdgraph report can read"),
        (["report", bench, "-o", bench], "one of the inputs"),
        (["report", bench, "-o", tmp_path], "is a folder"),
    ]
    (tmp_path / "list.json").write_text("[1, 2]")
    cases.append((["report", tmp_path / "list.json", "-o", tmp_path / "b.html"], "nothing sdgraph report can read"))
    (tmp_path / "broken.json").write_text("{")
    cases.append((["report", tmp_path / "broken.json", "-o", tmp_path / "c.html"], "not readable JSON"))
    for args, why in cases:
        r = sdgraph(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and why in lines[0], (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert bench.read_bytes() == before
    assert not list(tmp_path.glob("*.html"))
    existing = tmp_path / "r.html"
    existing.write_text("keep")
    r = sdgraph("report", bench, "-o", existing)
    assert r.returncode == 2 and existing.read_text() == "keep"
    r = sdgraph("report", bench, "-o", existing, "--force")
    assert r.returncode == 0 and existing.read_text().startswith("<!DOCTYPE html>")


# ----------------------------------------------------------------------------- in a real browser
def _browser():
    """A headless Chromium driven through Selenium, or None with the reason."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if not chromium or not driver_bin:
        return None, "Debian's chromium and chromium-driver are not installed (tools/setup_browser.sh installs them)"
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None, "selenium is not installed (the dev extra has it)"
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1800",
              "--allow-file-access-from-files"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver_bin), options=opts), ""


@pytest.mark.slow
def test_report_in_chromium(made, tmp_path):
    drv, why = _browser()
    if drv is None:
        pytest.skip(why)
    root = made["root"]
    out = tmp_path / "report.html"
    r = sdgraph("report", root / "verify", root / "bench.json", root / "opt.json", "-o", out)
    assert r.returncode == 0, r.stderr
    verify = json.loads((root / "verify" / "verify.json").read_text())
    try:
        drv.get(out.as_uri())
        # every image decodes
        sizes = drv.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]);")
        assert len(sizes) == 6 and all(c and w > 0 and h > 0 for c, w, h in sizes), sizes
        # the slider moves the split: a click at a quarter of the first image's width
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By

        box = drv.find_elements(By.CSS_SELECTOR, ".compare")[0]
        rng = box.find_element(By.CSS_SELECTOR, "input.split")
        split = "return getComputedStyle(arguments[0]).getPropertyValue('--split').trim();"
        assert drv.execute_script(split, box) == "50%"
        w = rng.size["width"]
        ActionChains(drv).move_to_element_with_offset(rng, -w // 4, 0).click().perform()
        value = int(rng.get_attribute("value"))
        assert 15 <= value <= 35, value
        assert drv.execute_script(split, box) == f"{value}%"
        clip = drv.execute_script("return getComputedStyle(arguments[0].querySelector('.cand-wrap')).clipPath;", box)
        assert f"{value}%" in clip, clip
        # the tables hold the numbers of the JSON
        shown = [float(td.get_attribute("data-value")) for td in drv.find_elements(By.CSS_SELECTOR, "td[data-key=cosine]")]
        assert shown == [m["cosine"] for s in verify["submodels"].values() for m in s["outputs"].values()]
        texts = [td.text for td in drv.find_elements(By.CSS_SELECTOR, "table.bench td[data-key=e2e_s]")]
        bench = json.loads((root / "bench.json").read_text())
        assert [float(t) for t in texts] == pytest.approx([x["e2e_s"] for x in bench["results"]], rel=1e-3)
        # no console errors
        errors = [e for e in drv.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert errors == []
        artifacts = Path(os.environ.get("SDGRAPH_TEST_ARTIFACTS", REPO / "test-artifacts"))
        artifacts.mkdir(parents=True, exist_ok=True)
        shot = artifacts / "report.png"
        assert drv.save_screenshot(str(shot))
        assert Image.open(shot).size[0] > 0
    finally:
        drv.quit()
