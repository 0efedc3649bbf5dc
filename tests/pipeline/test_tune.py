"""sdgraph tune and sdgraph build: the space, the budget and the front on data; then real studies on the
tiny SD1.5 export, here and on a local Ray cluster started by a fixture."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdgraph.errors import InputError, TargetUnavailable, UsageError

optuna = pytest.importorskip("optuna")  # the 'tune' extra; tools/setup.sh installs it

ROOT = Path(__file__).resolve().parents[2]

# 3 x 2 = 6 configurations, UNet only, one thread: every trial is quick
SPACE = """\
submodels: [unet]
stages:
  cleanup: [fold]
  tome:
    - none
    - tome: {ratio: [0.3, 0.6]}
  fusions: [none, fa]
targets:
  ort: {precision: [fp32], threads: [1]}
"""
FAST = ["--steps", "2", "--repeats", "1", "--seed", "3"]


def sdgraph(*args, env=None):
    env = dict(os.environ, COLUMNS="200", **(env or {}))
    return subprocess.run([sys.executable, "-m", "sdgraph", *map(str, args)], capture_output=True, text=True, env=env)


def _space(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ----------------------------------------------------------------------------------------- the space
def test_default_space_has_registered_passes_and_usable_targets_only():
    from sdgraph.passes import registry
    from sdgraph.pipeline.tune import load_space
    from sdgraph.targets.base import get_target

    sp = load_space()
    labels = {c.label for _, cs in sp.stages for c in cs}
    for optional in ("todo", "deepcache"):  # join by themselves once their pass is registered
        assert (optional in labels) == (optional in registry()), optional
        assert (optional in labels) or any(optional in n for n in sp.notes)
    assert {"fa", "tome", "qdq", "bf16", "fp16"} <= labels
    assert sp.targets and all(get_target(t).available()[0] for t in sp.targets)
    assert sp.size() > 100


def test_an_optional_pass_joins_the_space_when_it_is_registered(tmp_path, monkeypatch):
    from sdgraph.passes import Pass, PassResult, base
    from sdgraph.pipeline.tune import load_space

    text = "optional_passes: [lateral]\nstages:\n  a: [fold]\n  b: [none, {lateral: {k: [1, 2]}}]\ntargets:\n  ort: {}\n"
    sp = load_space(_space(tmp_path, text))
    assert [c.label for c in sp.stages[1][1]] == ["none"] and sp.size() == 1

    class Lateral(Pass):
        name = "lateral"
        summary = "test pass"
        options = (base.Option("k", int, 1, "k"),)

        def run(self, model):
            return PassResult(False)

    monkeypatch.setitem(base._REGISTRY, "lateral", Lateral)
    sp = load_space(_space(tmp_path, text))
    assert [c.label for c in sp.stages[1][1]] == ["none", "lateral"] and sp.size() == 3


def test_sampling_is_reproducible_and_gives_canonical_pipelines(tmp_path):
    from sdgraph.passes import format_pipeline, parse_pipeline
    from sdgraph.pipeline.tune import load_space

    sp = load_space(_space(tmp_path, SPACE))
    assert sp.size() == 6  # tome: none | ratio 0.3 | ratio 0.6; fusions: none | fa

    def draw():
        study = optuna.create_study(directions=["minimize", "maximize"], sampler=optuna.samplers.TPESampler(seed=3))
        return [sp.sample(study.ask()) for _ in range(6)]

    a, b = draw(), draw()
    assert a == b
    for cfg in a:
        assert cfg["pipeline"] == format_pipeline(parse_pipeline(cfg["pipeline"]))
        assert cfg["target"] == "ort" and cfg["precision"] == "fp32" and cfg["options"] == {"threads": 1}
        assert cfg["submodels"] == ["unet"] and cfg["pipeline"].startswith("fold")


@pytest.mark.parametrize("text, match", [
    ("stages:\n  a: [fold, nosuch]\ntargets:\n  ort: {}\n", "unknown pass 'nosuch'"),
    ("stages:\n  a: [{nosuch: {x: [1]}}]\ntargets:\n  ort: {}\n", "unknown pass 'nosuch'"),
    ("stages:\n  a: [{tome: {ratoi: [1]}}]\ntargets:\n  ort: {}\n", "no option 'ratoi'"),
    ("stages:\n  a: [fold]\ntargets:\n  nosuch: {}\n", "unknown target 'nosuch'"),
    ("stages:\n  a: [fold]\ntargets:\n  ort: {precision: [fp16]}\n", "does not take precision 'fp16'"),
    ("stages:\n  a: [fold]\ntargets:\n  ort: {threadz: [1]}\n", "no option 'threadz'"),
    ("stages:\n  a: [fold]\ntargets:\n  ort: {}\nextra: 1\n", "unknown key"),
    ("stages:\n  a: [none]\ntargets:\n  ort: {}\n", "no pass at all"),
])
def test_bad_space_files_are_usage_errors_naming_the_file(tmp_path, text, match):
    from sdgraph.pipeline.tune import load_space

    with pytest.raises(UsageError, match=match) as e:
        load_space(_space(tmp_path, text))
    assert "space.yaml" in str(e.value)


def test_space_file_missing_or_not_yaml_is_input_error(tmp_path):
    from sdgraph.pipeline.tune import load_space

    with pytest.raises(InputError, match="no such space file"):
        load_space(tmp_path / "nope.yaml")
    with pytest.raises(InputError, match="not valid YAML"):
        load_space(_space(tmp_path, "stages: [a, b\n"))


def test_targets_filter_unknown_is_usage_error_unusable_is_exit_3(tmp_path, monkeypatch):
    from sdgraph.pipeline.tune import load_space
    from sdgraph.targets.openvino import OpenVinoTarget

    p = _space(tmp_path, "stages:\n  a: [fold]\ntargets:\n  ort: {}\n")
    with pytest.raises(UsageError, match="unknown target 'nope'"):
        load_space(p, ["nope"])
    monkeypatch.setattr(OpenVinoTarget, "available", lambda self: (False, "openvino is not installed"))
    with pytest.raises(TargetUnavailable, match="pip install 'sdgraph\\[openvino\\]'"):
        load_space(p, ["openvino"])
    assert list(load_space(p, ["ort"]).targets) == ["ort"]


def test_a_precision_this_machine_would_fall_back_from_is_left_out_with_a_note(tmp_path, monkeypatch):
    import openvino

    from sdgraph.pipeline.tune import load_space
    from sdgraph.targets.openvino import OpenVinoTarget

    class FakeCore:  # what OpenVINO reports of a CPU with or without bf16 kernels
        caps = ["FP32", "INT8"]

        def get_property(self, device, name):
            assert (device, name) == ("CPU", "OPTIMIZATION_CAPABILITIES")
            return list(self.caps)

    monkeypatch.setattr(openvino, "Core", FakeCore)
    ok, why = OpenVinoTarget().precision_native("bf16")
    assert not ok and "no bf16 kernels" in why and "FP32, INT8" in why
    assert OpenVinoTarget().precision_native("fp32") == (True, "") and OpenVinoTarget().precision_native("int8")[0]
    p = _space(tmp_path, "stages:\n  a: [fold]\ntargets:\n  ort: {}\n  openvino: {precision: [fp32, bf16]}\n")
    sp = load_space(p)
    assert sp.targets["openvino"]["precision"] == ("fp32",) and sp.size() == 2
    assert any(n.startswith("target openvino precision bf16 left out: this CPU has no bf16 kernels") for n in sp.notes)
    only_bf16 = _space(tmp_path, "stages:\n  a: [fold]\ntargets:\n  ort: {}\n  openvino: {precision: [bf16]}\n", "b.yaml")
    assert list(load_space(only_bf16).targets) == ["ort"]  # nothing left of it: the target is out
    FakeCore.caps = ["FP32", "BF16", "INT8"]
    assert OpenVinoTarget().precision_native("bf16") == (True, "")
    assert load_space(p).targets["openvino"]["precision"] == ("fp32", "bf16")


# ------------------------------------------------------------------------------ budget, front, time
def test_budget_primary_fails_and_shortfall():
    from sdgraph.pipeline.tune import Budget

    assert Budget().primary == "psnr_min" and Budget(min_ssim=0.9).primary == "ssim_min"
    assert Budget(min_cosine=0.99).primary == "cosine_min" and Budget(min_clip=20).primary == "clip_score"
    b = Budget(min_psnr=30, min_ssim=0.95)
    assert b.fails({"psnr_min": 31, "ssim_min": 0.96}) == []
    assert b.fails({"psnr_min": 29.5, "ssim_min": 0.96}) == ["PSNR 29.50 dB < 30"]
    assert b.fails({"psnr_min": float("nan"), "ssim_min": 0.96})  # NaN never passes
    assert b.shortfall({"psnr_min": 31, "ssim_min": 0.96}) == 0
    assert b.shortfall({"psnr_min": 27, "ssim_min": 0.96}) == pytest.approx(0.1)
    assert b.shortfall({"psnr_min": 29, "ssim_min": 0.95 * 0.5}) == pytest.approx(0.5)
    assert Budget(min_clip=20).fails({}) == ["CLIP score None < 20"]


def test_pareto_front_and_chosen_rows():
    from sdgraph.pipeline.tune.study import _pareto, study_rows

    def rec(n, s, psnr, state="complete", dup=None):
        return {"number": n, "state": state, "metrics": {"e2e_s": s, "psnr_min": psnr}, "config": {"pipeline": "fold"},
                "duplicate_of": dup}

    records = [rec(0, 1.0, 40), rec(1, 0.5, 35), rec(2, 0.8, 30), rec(3, 0.5, 35, dup=1), rec(4, 2.0, 100),
               rec(5, 0.1, 1, state="pruned")]
    assert _pareto(records, "psnr_min") == [0, 1, 4]  # 2 is beaten by 1; 3 repeats 1; 5 was pruned
    rows = study_rows(records, [0, 1, 4], chosen=1)
    assert rows[1][0] == "1 *" and rows[1][11] == "yes" and rows[2][11] == ""
    assert rows[3][-1].startswith("same as trial 1")


def test_time_parsing_and_bounds():
    from sdgraph.cli.tune import parse_duration

    assert parse_duration("90") == 90 and parse_duration("30m") == 1800 and parse_duration("2h") == 7200
    for bad in ("5x", "-1", "m"):
        with pytest.raises(UsageError):
            parse_duration(bad)
    with pytest.raises(UsageError, match="must be in"):
        parse_duration("400d")


# ---------------------------------------------------------------------------------------- bad input
def test_cli_bad_input_one_line_exit_2(tmp_path):
    """Unknown pass in the space, CLIP budget without a CLIP model, an unreachable Ray head: exit 2 before any work."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "sdgraph.json").write_text('{"kind": "model"}')
    bad = _space(tmp_path, "stages:\n  a: [fold, nosuch]\ntargets:\n  ort: {}\n", "bad.yaml")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cases = [(["--space", bad], "bad.yaml: stage 'a': unknown pass 'nosuch'"),
             (["--min-clip", "20"], "--min-clip needs a local CLIP model"),
             (["--ray", f"127.0.0.1:{port}", "--space", _space(tmp_path, SPACE)], f"--ray 127.0.0.1:{port}: cannot reach")]
    from tests.reliability.support import invoke

    for extra, msg in cases:
        r = invoke(["tune", model, "-o", tmp_path / "study", *extra])  # in process: the CLI's own exit path
        assert r.code == 2, r.stderr
        assert len(r.error_lines) == 1 and msg in r.error_lines[0], r.stderr
        assert "Traceback" not in r.stderr
        assert not (tmp_path / "study").exists()  # refused before the study folder is made
    r = invoke(["verify", model, model, "--ray", f"127.0.0.1:{port}"])  # verify --ray: the same check
    assert r.code == 2 and f"--ray 127.0.0.1:{port}: cannot reach" in r.error_lines[0], r.stderr


def test_build_refuses_bad_recipes(tmp_path):
    from sdgraph.pipeline.tune import build

    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(InputError, match="no such recipe"):
        build(model, tmp_path / "r.yaml", tmp_path / "out")
    (tmp_path / "r.yaml").write_text("pipeline: fold\ntarget: ort\n")
    with pytest.raises(InputError, match="not an sdgraph recipe"):
        build(model, tmp_path / "r.yaml", tmp_path / "out")
    (tmp_path / "r.yaml").write_text("sdgraph_recipe: 1\npipeline: fold,nosuch\ntarget: ort\n")
    with pytest.raises(UsageError, match="unknown pass 'nosuch'"):
        build(model, tmp_path / "r.yaml", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- real studies
@pytest.fixture(scope="module")
def local_study(tiny_sd15_onnx, tmp_path_factory):
    root = tmp_path_factory.mktemp("tune-local")
    space = _space(root, SPACE)
    r = sdgraph("tune", tiny_sd15_onnx, "-o", root / "study", "--space", space, "--trials", "4", "--min-psnr", "20", *FAST)
    assert r.returncode == 0, r.stderr
    return root, space, json.loads((root / "study" / "trials.json").read_text())


def _trials_by_config(doc):
    out = {}
    for t in doc["trials"]:
        out[json.dumps(t["config"], sort_keys=True)] = (t["state"], t["metrics"].get("psnr_min"), t["metrics"].get("ssim_min"),
                                                         t["metrics"].get("unet_cosine"))
    return out


@pytest.mark.slow
def test_tune_writes_the_study_then_build_replays_the_recipe_and_resume_grows(local_study, tiny_sd15_onnx, tmp_path):
    root, space, doc = local_study
    study = root / "study"
    trials = doc["trials"]
    assert len(trials) == 4 and all(t["state"] == "complete" for t in trials)
    for t in trials:  # every trial's bench and verify numbers
        assert t["bench"]["e2e_s"] > 0 and t["bench"]["e2e_s_runs"] and t["verify"]["images"]
        assert 0 < t["metrics"]["ssim_min"] <= 1 and t["metrics"]["unet_cosine"] > 0.9
        assert any(k.startswith("unet/") for k in t["graph_sha256"])
    fold_only = [t for t in trials if t["config"]["pipeline"] == "fold"]
    assert all(t["metrics"]["psnr_min"] == 100.0 for t in fold_only)  # exact pass: identical images (capped)
    ok = [t for t in trials if not t["fails"] and t.get("duplicate_of") is None]
    chosen = min(ok, key=lambda t: t["metrics"]["e2e_s"])
    assert doc["chosen"] == chosen["number"] and chosen["number"] in doc["front"]
    svg = (study / "front.svg").read_text()
    assert svg.count('class="pt front"') == len(doc["front"])
    assert svg.count("<circle") == len([t for t in trials if t.get("duplicate_of") is None])

    # build replays the recipe: the same graphs, byte for byte; the manifest names the recipe and its hash
    recipe = tmp_path / "recipe.yaml"
    shutil.copy(study / "recipe.yaml", recipe)
    r = sdgraph("build", tiny_sd15_onnx, "--recipe", recipe, "-o", tmp_path / "art")
    assert r.returncode == 0, r.stderr
    from sdgraph.manifest import file_hash, read_manifest
    from sdgraph.pipeline.tune.objective import artifact_hashes

    assert artifact_hashes(tmp_path / "art") == chosen["graph_sha256"]
    m = read_manifest(tmp_path / "art")
    assert m["recipe"]["sha256"] == file_hash(recipe) and m["source"]["pipeline"] == chosen["config"]["pipeline"]
    assert sdgraph("build", tiny_sd15_onnx, "--recipe", recipe, "-o", tmp_path / "art").returncode == 2  # no --force

    # resume: the study grows; a budget no configuration meets exits 1 naming the closest trial
    r = sdgraph("tune", tiny_sd15_onnx, "-o", study, "--space", space, "--trials", "1", "--resume", "--min-psnr", "999", *FAST)
    assert r.returncode == 1, r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "no trial meets the budget (PSNR >= 999.0); closest: trial " in err[0]
    after = json.loads((study / "trials.json").read_text())
    assert len(after["trials"]) == 5 and after["chosen"] is None and not (study / "recipe.yaml").exists()
    closest = int(err[0].split("closest: trial ")[1].split()[0])
    best = max(t["metrics"]["psnr_min"] for t in after["trials"])
    assert after["trials"][closest]["metrics"]["psnr_min"] == best  # the highest PSNR is the closest to 999
    # resuming with other image settings is refused
    r = sdgraph("tune", tiny_sd15_onnx, "-o", study, "--space", space, "--trials", "1", "--resume", "--steps", "3")
    assert r.returncode == 2 and "resume with the same settings" in r.stderr


def _ray_pids(temp_dir: Path) -> list[int]:
    """The processes of the Ray head this fixture started: command lines naming its own temp dir, and their children
    (workers rename themselves ``ray::...``)."""
    parents: dict[int, int] = {}
    mine: set[int] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if str(temp_dir).encode() in cmd:
            mine.add(int(proc.name))
    grew = True
    while grew:
        kids = {pid for pid, ppid in parents.items() if ppid in mine and pid not in mine}
        mine |= kids
        grew = bool(kids)
    mine.discard(os.getpid())
    return sorted(mine)


def _stop_ray_head(temp_dir: Path) -> None:
    import signal

    pids = _ray_pids(temp_dir)
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 0.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
            time.sleep(0.2)


@pytest.fixture
def ray_head(tmp_path_factory):
    ray_bin = Path(sys.executable).parent / "ray"
    if not ray_bin.exists():
        pytest.skip("ray is not installed (pip install 'sdgraph[tune]')")
    temp = Path("/tmp") / f"sdg-ray-{os.getpid()}-{int(time.time())}"  # short: Ray's socket paths have a length limit
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([str(ray_bin), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                        "--temp-dir", str(temp), "--num-cpus", "2", "--include-dashboard=false", "--disable-usage-stats"],
                       capture_output=True, text=True, env=env, timeout=240)
    try:
        assert r.returncode == 0, r.stderr[-2000:]
        yield f"127.0.0.1:{port}"
    finally:
        _stop_ray_head(temp)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_tune_on_a_local_ray_cluster_gives_the_local_front(local_study, tiny_sd15_onnx, ray_head, tmp_path):
    root, space, local = local_study
    r = sdgraph("tune", tiny_sd15_onnx, "-o", tmp_path / "study", "--space", space, "--trials", "4", "--min-psnr", "20",
                "--ray", ray_head, *FAST)
    assert r.returncode == 0, r.stderr
    assert f"ray {ray_head}: 1 trial(s) at a time, 2 CPU(s) each" in r.stderr
    remote = json.loads((tmp_path / "study" / "trials.json").read_text())
    a, b = _trials_by_config(local), _trials_by_config(remote)
    assert a.keys() == b.keys()  # the same configurations, sampled in the same order
    for key, (state, psnr, ssim, cos) in a.items():
        state2, psnr2, ssim2, cos2 = b[key]
        assert state == state2 and psnr2 == pytest.approx(psnr, abs=0.05) and ssim2 == pytest.approx(ssim, abs=1e-4)
        assert cos2 == pytest.approx(cos, abs=1e-6)
    # trial by trial: the same configuration in the same order (front membership also weighs timings, which
    # differ run to run; what the front is drawn from, configurations and their fidelity, is the same)
    assert [t["config"] for t in local["trials"]] == [t["config"] for t in remote["trials"]]
    assert [t.get("duplicate_of") for t in local["trials"]] == [t.get("duplicate_of") for t in remote["trials"]]
    assert remote["front"] and set(remote["front"]) <= {t["number"] for t in remote["trials"]}

    # verify --ray: the prompt x seed grid made by Ray tasks
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red bicycle\na bowl of ramen\n")
    r = sdgraph("verify", tiny_sd15_onnx, tiny_sd15_onnx, "--prompt-file", prompts, "--seeds", "0,1", "--steps", "2",
                "--ray", ray_head, "-o", tmp_path / "verify", "--min-psnr", "99")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "verify" / "verify.json").read_text())
    assert rep["ray"]["tasks"] == 1 and rep["ray"]["cpus_per_task"] == 2
    assert [(m["prompt"], m["seed"]) for m in rep["images"]] == [("a red bicycle", 0), ("a red bicycle", 1),
                                                                 ("a bowl of ramen", 0), ("a bowl of ramen", 1)]
    assert all(m["max_pixel_diff"] == 0 for m in rep["images"])  # the same dir on both sides: identical images


@pytest.mark.parametrize("seeds", [(0,), (0, 1)])
def test_a_trial_makes_each_candidate_image_once_and_warms_up_short(tiny_sd15_onnx, tmp_path, monkeypatch, seeds):
    """bench's timed image is the candidate's first fidelity image; warm-ups take --warmup-steps steps."""
    from sdgraph.pipeline import runner
    from sdgraph.pipeline.tune.objective import _REF, run_trial

    calls: list[tuple[str, int, int]] = []  # (reference or candidate, steps, seed)
    real = runner.Pipeline.generate

    def counted(self, prompt, **kw):
        calls.append(("ref" if Path(self.path).resolve() == Path(tiny_sd15_onnx).resolve() else "cand", kw["steps"], kw["seed"]))
        return real(self, prompt, **kw)

    monkeypatch.setattr(runner.Pipeline, "generate", counted)
    _REF.clear()
    settings = {"steps": 2, "height": None, "width": None, "guidance": 7.5, "repeats": 1, "warmup_steps": 1,
                "prompts": ["a red cube"], "seeds": list(seeds), "budget": {"min_psnr": 20.0}, "clip_model": None,
                "work_dir": str(tmp_path / "work")}
    config = {"pipeline": "fold", "submodels": ["unet"], "target": "ort", "precision": "fp32", "options": {"threads": 1}}
    res = run_trial(str(tiny_sd15_onnx), config, settings)
    _REF.clear()
    assert res["status"] == "ok", res["error"]
    ref = [c for c in calls if c[0] == "ref"]
    cand = [c for c in calls if c[0] == "cand"]
    assert ref == [("ref", 2, s) for s in seeds]
    # bench: two 1-step warm-ups, one timed 2-step image (seed 0); then only the other seeds' images
    assert cand == [("cand", 1, 0), ("cand", 1, 0), ("cand", 2, 0)] + [("cand", 2, s) for s in seeds[1:]]
    assert [m["psnr"] for m in res["verify"]["images"]] == [float("inf")] * len(seeds)  # fold is exact
    assert res["metrics"]["psnr_min"] == 100.0 and res["bench"]["e2e_s"] > 0
    # the trial's folder (and bench's images) removed; the reference images stay, one PNG per (prompt, seed)
    kept = list((tmp_path / "work").iterdir())
    assert len(kept) == 1 and kept[0].name.startswith("reference-")
    assert sorted(f.name for f in kept[0].iterdir()) == [f"{i}.png" for i in range(len(seeds))]
    # a new process (a resumed study, the next --time slice) reads them instead of generating them again
    calls.clear()
    again = run_trial(str(tiny_sd15_onnx), config, settings)
    _REF.clear()
    assert [c for c in calls if c[0] == "ref"] == [] and again["metrics"]["psnr_min"] == 100.0
    assert [m["max_pixel_diff"] for m in again["verify"]["images"]] == [0] * len(seeds)


def test_stored_reference_images_are_keyed_on_the_model_files(tmp_path):
    from sdgraph.pipeline.tune.objective import _model_identity

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "model.onnx").write_bytes(b"a")
    first = _model_identity(str(tmp_path))
    assert _model_identity(str(tmp_path)) == first
    (tmp_path / "unet" / "model.onnx").write_bytes(b"ab")  # another model under the same path
    assert _model_identity(str(tmp_path)) != first


def test_a_capped_trial_is_pruned_with_a_lower_bound_and_makes_no_fidelity_image(tiny_sd15_onnx, tmp_path, monkeypatch):
    from sdgraph.pipeline import runner
    from sdgraph.pipeline.tune.objective import _REF, run_trial

    refs: list[int] = []
    real = runner.Pipeline.generate

    def counted(self, prompt, **kw):
        if Path(self.path).resolve() == Path(tiny_sd15_onnx).resolve():
            refs.append(kw["seed"])
        return real(self, prompt, **kw)

    monkeypatch.setattr(runner.Pipeline, "generate", counted)
    _REF.clear()
    settings = {"steps": 2, "height": None, "width": None, "guidance": 7.5, "repeats": 1, "warmup_steps": 1,
                "prompts": ["a red cube"], "seeds": [0], "budget": {"min_psnr": 20.0}, "clip_model": None,
                "work_dir": str(tmp_path / "work"), "time_limit_s": 1e-6}
    config = {"pipeline": "fold", "submodels": ["unet"], "target": "ort", "precision": "fp32", "options": {"threads": 1}}
    res = run_trial(str(tiny_sd15_onnx), config, settings)
    _REF.clear()
    assert res["status"] == "pruned" and res["error"].startswith("capped: its timed image ran")
    assert 0 < res["metrics"]["e2e_s_at_least"] and "e2e_s" not in res["metrics"] and "psnr_min" not in res["metrics"]
    assert refs == []  # stopped before any reference image was needed


def test_the_cap_follows_the_fastest_trial_within_budget(tiny_sd15_onnx, tmp_path, monkeypatch):
    """--cap: no limit until a trial meets the budget; then cap x the fastest such trial (faster misses don't count)."""
    from sdgraph.pipeline.tune import Budget, load_space, study

    sp = load_space(_space(tmp_path, "stages:\n  t: [none, {tome: {ratio: [0.2, 0.4, 0.6, 0.8]}}]\n"
                                    "targets:\n  ort: {threads: [1]}\n"))
    # per configuration: (s/image, PSNR); ratio 0.8 is the fastest but misses the 30 dB budget
    table = {"": (4.0, 60.0), "0.2": (3.0, 50.0), "0.4": (2.0, 40.0), "0.6": (1.5, 35.0), "0.8": (0.5, 20.0)}
    limits: list = []

    def fake(model_dir, config, settings):
        limits.append(settings.get("time_limit_s"))
        ratio = config["pipeline"].split("ratio=")[1].rstrip("}") if "ratio=" in config["pipeline"] else ""
        e2e, db = table[ratio]
        limit = settings.get("time_limit_s")
        if limit and e2e > limit:
            return {"config": dict(config), "status": "pruned", "error": "capped", "metrics": {"e2e_s_at_least": limit}}
        return {"config": dict(config), "status": "ok", "error": None, "metrics": {"e2e_s": e2e, "psnr_min": db}}

    monkeypatch.setattr(study, "run_trial", fake)
    res = study.tune(tiny_sd15_onnx, tmp_path / "s", sp, budget=Budget(min_psnr=30), trials=12, cap=1.5, seed=1,
                     progress=lambda m: None)
    ran = [r for r in res.trials if r.get("duplicate_of") is None]
    assert len(ran) == len(limits) == 5  # every configuration once, the rest are repeats
    best = None
    for r, limit in zip(ran, limits):
        assert limit == (None if best is None else 1.5 * best)
        m = r["metrics"]
        if r["state"] == "complete" and m["psnr_min"] >= 30:
            best = m["e2e_s"] if best is None else min(best, m["e2e_s"])
        if r["state"] == "pruned":
            assert limit is not None and m["e2e_s_at_least"] == limit
    assert any(limit for limit in limits) and res.chosen["metrics"]["e2e_s"] == best == 1.5
    capped = [r for r in ran if r["state"] == "pruned"]
    assert capped and all(table[r["config"]["pipeline"].split("ratio=")[1].rstrip("}")
                                if "ratio=" in r["config"]["pipeline"] else ""][0] > r["metrics"]["e2e_s_at_least"]
                          for r in capped)
    rows = study.study_rows(res.trials, res.front, res.chosen["number"])
    assert [row[6] for row in rows if row[1] == "pruned"][:1] == [f"> {capped[0]['metrics']['e2e_s_at_least']:.3f}"]


def test_resume_closes_interrupted_trials_and_the_sampler_goes_on(tiny_sd15_onnx, tmp_path, monkeypatch):
    from sdgraph.pipeline.tune import Budget, load_space, study

    sp = load_space(_space(tmp_path, "stages:\n  t: [none, {tome: {ratio: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]}}]\n"
                                    "targets:\n  ort: {threads: [1]}\n"))
    ran: list[str] = []

    def fake(model_dir, config, settings):
        ran.append(config["pipeline"])
        return {"config": dict(config), "status": "ok", "error": None, "metrics": {"e2e_s": 1.0 + len(ran), "psnr_min": 40.0}}

    monkeypatch.setattr(study, "run_trial", fake)
    kw = dict(budget=Budget(min_psnr=30), seed=0, progress=lambda m: None)
    study.tune(tiny_sd15_onnx, tmp_path / "s", sp, trials=3, **kw)
    first = list(ran)
    # a driver killed mid-trial leaves a RUNNING trial in the storage
    st = optuna.load_study(study_name=study.STUDY_NAME, storage=f"sqlite:///{tmp_path / 's' / 'study.db'}")
    stale = st.ask().number
    (tmp_path / "s" / ".work" / "trial-left").mkdir(parents=True)  # its folder, left by the killed driver
    lines: list[str] = []
    res = study.tune(tiny_sd15_onnx, tmp_path / "s", sp, trials=3, resume=True, **{**kw, "progress": lines.append})
    rec = next(r for r in res.trials if r["number"] == stale)
    assert rec["state"] == "fail" and rec["error"].startswith("interrupted") and f"trial {stale}: interrupted" in lines[0]
    # seeded as at the start, the sampler would ask trials 0-2's configurations again (all duplicates)
    dup = [r for r in res.trials if r.get("duplicate_of") is not None]
    assert len(ran) - len(first) + len(dup) == 3 and len(ran) > len(first)
    assert not any(r["state"] == "running" for r in res.trials)
    assert not (tmp_path / "s" / ".work" / "trial-left").exists()
