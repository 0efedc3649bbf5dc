"""Every command's ``--json``: one strict JSON document on stdout with the fields docs/cli-conventions.md lists.

The schemas are read from the docs page itself (one table of top-level fields per command), so the
page and the output cannot drift apart. Commands run in-process on the tiny SD1.5 export.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sdgraph import progress
from sdgraph.cli import app

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli-conventions.md"
TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "list": list, "object": dict,
         "null": type(None)}
# strict JSON: infinite and NaN numbers are these strings
NON_FINITE = ("inf", "-inf", "nan")


def schemas() -> dict[str, tuple[str, dict[str, tuple[tuple, bool]]]]:
    """``{"sdgraph bench --json": (shape, {field: (types, optional)})}`` from the docs page."""
    out, title, shape = {}, None, "object"
    for line in DOC.read_text().splitlines():
        m = re.match(r"### `(sdgraph [^`]+)`", line)
        if m:
            title, shape = m.group(1), "object"
            out[title] = (shape, {})
            continue
        if title is None:
            continue
        if line.startswith("A list of objects"):
            out[title] = ("list", out[title][1])
        elif line.startswith("An object keyed by"):
            out[title] = ("keyed", out[title][1])
        m = re.match(r"\| `([a-z_0-9]+)` \| ([^|]+) \|", line)
        if m:
            words = m.group(2).strip()
            optional = "optional" in words
            kinds = tuple(TYPES[w] for w in re.findall(r"[a-z]+", words) if w in TYPES)
            assert kinds, f"{title}: {m.group(1)}: no type in {words!r}"
            out[title][1][m.group(1)] = (kinds, optional)
    return out


SCHEMAS = schemas()


def check(title: str, data) -> None:
    shape, fields = SCHEMAS[title]
    assert fields, f"{title}: no field table in {DOC.name}"
    objs = {"object": lambda d: [d], "list": lambda d: d, "keyed": lambda d: list(d.values())}[shape](data)
    assert isinstance(objs, list) and objs, (title, type(data))
    for obj in objs:
        assert isinstance(obj, dict), (title, obj)
        assert set(obj) <= set(fields), f"{title}: undocumented {sorted(set(obj) - set(fields))}"
        missing = [f for f, (_, opt) in fields.items() if not opt and f not in obj]
        assert not missing, f"{title}: documented but missing {missing}"
        for f, v in obj.items():
            kinds = fields[f][0]
            ok = isinstance(v, kinds) and not (isinstance(v, bool) and bool not in kinds and int in _flat(kinds))
            assert ok or (v in NON_FINITE and float in _flat(kinds)), f"{title}: {f}={v!r} is not {kinds}"


def _flat(kinds):
    for k in kinds:
        yield from (k if isinstance(k, tuple) else (k,))


def invoke(*args, ok=(0,)):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code in ok, (args, r.exit_code, r.output, r.exception)
    return json.loads(r.stdout)  # strict: the whole of stdout is the document


def test_docs_list_every_json_command():
    import typer.main

    cmd = typer.main.get_command(app)
    with_json = {name for name, c in cmd.commands.items() if any("--json" in p.opts for p in c.params)}
    documented = {t.split()[1] for t in SCHEMAS}
    assert with_json == documented, (with_json ^ documented)
    for t, (_, fields) in SCHEMAS.items():
        assert fields, t


@pytest.fixture(scope="module")
def sd15(tiny_onnx):
    return tiny_onnx("sd15")


def test_json_of_file_commands(sd15, tmp_path, monkeypatch):
    unet = sd15 / "unet" / "model.onnx"
    check("sdgraph inspect --json", invoke("inspect", unet, "--json"))
    check("sdgraph tome-estimate --json", invoke("tome-estimate", unet, "--json", "--max-downsample", 1))
    te = sd15 / "text_encoder" / "model.onnx"
    check("sdgraph optimize --dry-run --json", invoke("optimize", te, "--passes", "fold", "-o", tmp_path / "t.onnx",
                                                       "--dry-run", "--json"))
    check("sdgraph optimize --json", invoke("optimize", te, "--passes", "fold,cse", "-o", tmp_path / "t.onnx", "--json"))
    monkeypatch.setenv("SDGRAPH_CACHE_DIR", str(tmp_path / "cache"))  # a cache of this test's own
    check("sdgraph lower --dry-run --json", invoke("lower", tmp_path / "t.onnx", "--target", "ort", "-o", tmp_path / "a",
                                                    "--dry-run", "--json"))
    low = invoke("lower", tmp_path / "t.onnx", "--target", "ort", "-o", tmp_path / "a", "--json")
    check("sdgraph lower --json", low)
    assert low["submodels"]["text_encoder"]["cache"] == "miss" and low["files"]["text_encoder"]
    c = invoke("cache", "--json")
    check("sdgraph cache --json", c)
    assert c["count"] == len(c["entries"]) == 1 and c["entries"][0]["target"] == "ort" and c["bytes"] > 0
    pruned = invoke("cache", "--prune", 0, "--json")
    check("sdgraph cache --json", pruned)
    assert pruned["evicted"] == 1 and pruned["count"] == 0 and pruned["removed"] is None
    check("sdgraph report --json", invoke("report", sd15, "-o", tmp_path / "r.html", "--json"))
    v = invoke("verify", te, tmp_path / "t.onnx", "--json")
    check("sdgraph verify --json", v)
    assert v["summary"]["cosine_min"] > 0.9999


def test_json_of_registry_commands():
    t = invoke("targets", "--json")
    check("sdgraph targets --json", t)
    check("sdgraph doctor --json", invoke("doctor", "--json"))
    p = invoke("passes", "--json")
    check("sdgraph passes --json", p)
    assert {x["name"] for x in p["passes"]} >= {"fold", "tome"}


def test_json_of_image_commands(sd15, tmp_path):
    r = invoke("run", sd15, "-p", "a cat", "--steps", 1, "-n", 2, "-o", tmp_path / "o", "--json")
    check("sdgraph run --json", r)
    assert r["count"] == 2 and all(Path(p).is_file() for p in r["images"]) and r["steps"] == 1
    b = invoke("bench", sd15, "--steps", 1, "--repeats", 1, "--json", "--json-out", tmp_path / "b.json")
    check("sdgraph bench --json", b)
    assert b == json.loads((tmp_path / "b.json").read_text())  # the file sdgraph report reads: the same data
    v = invoke("verify", sd15, sd15, "--steps", 1, "--prompt", "a cat", "--json")
    check("sdgraph verify --json", v)
    assert v["images"][0]["psnr"] == "inf"  # identical images: strict JSON says "inf"


def test_bench_old_json_file_form_is_refused_with_the_new_spelling(sd15, tmp_path):
    r = CliRunner().invoke(app, ["bench", str(sd15), "--json", str(tmp_path / "bench.json")])
    assert r.exit_code == 2 and "--json-out" in r.output and not (tmp_path / "bench.json").exists()


def test_export_json_and_its_progress(tiny_sd15_pipeline, tmp_path):
    rec = progress.Recorder()
    with progress.using(rec):  # off a terminal the CLI leaves the installed reporter alone
        m = invoke("export", tiny_sd15_pipeline, "-o", tmp_path / "m", "--submodels", "text_encoder,vae_decoder", "--json")
    check("sdgraph export --json", m)
    assert m == json.loads((tmp_path / "m" / "sdgraph.json").read_text())
    (t,) = rec.named("export")
    assert (t.total, t.advances) == (2, 2)
    assert "export text_encoder: verify" in t.descriptions and t.descriptions[-1] == "export vae_decoder: done"


def test_demo_json_prints_the_report_only(monkeypatch, tmp_path):
    import sdgraph.pipeline.main_job as mj

    demo = json.loads(json.dumps({"out": str(tmp_path), "stages": {"export": 1.5}, "skipped": [], "failed": ["x: FAILED (y)"],
                                  "pipelines": {"opt": "fold"}, "artifacts": {}, "image": None, "bench_labels": [],
                                  "verify": {}, "seconds": 2.0, "report": None}))
    monkeypatch.setattr(mj, "run_demo", lambda *a, **k: demo)
    r = CliRunner().invoke(app, ["demo", "-o", str(tmp_path / "d"), "--json"])
    assert r.exit_code == 1 and json.loads(r.stdout) == demo and "failed: x" in r.stderr
    check("sdgraph demo --json", demo)


# -- progress through the command line -------------------------------------------------------------
@pytest.mark.parametrize("env, args, bars", [
    ("always", [], True),          # forced off a terminal: the bars' final state, once
    (None, [], False),             # no terminal: nothing but the usual lines
    ("always", ["-q"], False),     # -q: no bars
    ("always", ["--json"], False),  # --json: no bars
])
def test_run_progress_on_stderr(sd15, tmp_path, monkeypatch, env, args, bars):
    if env:
        monkeypatch.setenv(progress.ENV, env)
    else:
        monkeypatch.delenv(progress.ENV, raising=False)
    quiet = ["-q"] if "-q" in args else []
    rest = [a for a in args if a != "-q"]
    r = CliRunner().invoke(app, [*quiet, "run", str(sd15), "-p", "a cat", "--steps", "3", "--scheduler", "ddim",
                                 "-o", str(tmp_path / "o.png"), *rest])
    assert r.exit_code == 0, r.output
    assert ("denoising" in r.stderr and "3/3" in r.stderr) == bars, r.stderr
    if not bars:
        assert "━" not in r.stderr and "denoising" not in r.stderr
    if "--json" in rest:
        assert json.loads(r.stdout)["steps"] == 3
