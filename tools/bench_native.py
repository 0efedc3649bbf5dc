"""Native lowering and precision-as-target-mode benchmark: full-size SD1.5-architecture UNet on OpenVINO.

Usage (under the heavy-job lock; every figure is timed side by side in this one process):

    flock /tmp/sdgraph-heavy.lock .venv/bin/python tools/bench_native.py [--src /tmp/sdgraph-full/sd15-onnx] \\
        [--work /tmp/sdgraph-native-bench] [--rounds 3] [--size 512] [--profile] [--json OUT.json]

The source is the random-weight full-size export of tools/build_full_model.py (built when missing).
Rows, each a `sdgraph lower` artifact of the UNet at one static shape (batch 1):
  ov-fp32            plain export, OpenVINO fp32
  native-fp32        fold,fa,gn,geglu lowered with native=true (SDPA, GroupNormalization, Gelu), fp32
  ov-bf16            plain export in OpenVINO's own bf16 mode (INFERENCE_PRECISION_HINT=bf16)
  native-bf16-mode   fold,fa,gn,geglu,bf16{mode=target}: bf16 as a target mode with the keep list (natively
                     lowered canonical ops left to OpenVINO's bf16 kernels, the rest of the keep list precise)
  native-bf16-precise  the same, lowered with precise_native=true: every kept node precise, SDPA and
                     GroupNormalization included
Calls alternate between the rows of a group (fp32 pair, then the bf16 rows) round by round; the ratios are of medians.
Each row's output is compared with ov-fp32's on the same inputs (cosine, max abs). --profile adds
OpenVINO's PERF_COUNT per layer type (one extra call per row).
Goals (issue 16): native-fp32 <= 0.90x ov-fp32; bf16 as a target mode <= 1.0x ov-bf16.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import cpu_flags, emit_report  # noqa: E402  (tools/ helpers)

ROWS = ("ov-fp32", "native-fp32", "ov-bf16", "native-bf16-mode", "native-bf16-precise")
OPTIONS = {"native-bf16-precise": {"precise_native": "true"}}


def _feeds(size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    lat = size // 8
    return {"sample": rng.standard_normal((1, 4, lat, lat), dtype=np.float32),
            "timestep": np.array([999], dtype=np.int64),
            "encoder_hidden_states": rng.standard_normal((1, 77, 768), dtype=np.float32)}


def _fit(runner, feeds):
    out = {}
    for name in runner.input_names:
        dt = getattr(runner, "input_dtypes", {}).get(name, feeds[name].dtype)
        out[name] = feeds[name].astype(dt)
    return out


def _compare(a: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, float]:
    """Worst cosine and max abs over the outputs (sdgraph's own comparison, as verify uses)."""
    from sdgraph.ir import runtime

    w = runtime.worst(runtime.compare(ref, a))
    return {"cosine": round(w["cosine"], 6), "max_abs": round(w["max_abs"], 5)}


def _profile(art: Path) -> dict[str, float]:
    """ms per OpenVINO layer type over one call (PERF_COUNT), largest first."""
    import openvino as ov

    from sdgraph.manifest import read_manifest

    entry = read_manifest(art)["submodels"]["unet"]
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(art / "unet" / entry["xml"])), "CPU",
                                  {**entry["config"], "PERF_COUNT": "YES"})
    req = compiled.create_infer_request()
    feeds = {p.any_name: np.zeros([d.get_length() for d in p.get_partial_shape()], p.get_element_type().to_dtype())
             for p in compiled.inputs}
    req.infer(feeds)
    per: dict[str, float] = collections.defaultdict(float)
    for info in req.profiling_info:
        per[f"{info.node_type}:{info.exec_type.split('_')[-1]}"] += info.real_time.total_seconds() * 1e3
    return dict(sorted(((k, round(v, 1)) for k, v in per.items()), key=lambda kv: -kv[1])[:15])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=Path("/tmp/sdgraph-full/sd15-onnx"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/sdgraph-native-bench"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from sdgraph.passes.manager import optimize_path
    from sdgraph.targets import load_artifact, lower

    if not (args.src / "unet" / "model.onnx").is_file():
        subprocess.run([sys.executable, str(Path(__file__).with_name("build_full_model.py")), "--arch", "sd15",
                        "--out", str(args.src.parent)], check=True)
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stages = {}
    if not (w / "fused" / "unet" / "model.onnx").is_file():
        optimize_path(args.src, "fold,fa,gn,geglu", w / "fused", submodels=["unet"])
    stages["fused_s"] = round(time.perf_counter() - t0, 1)
    if not (w / "fused-bf16mode" / "unet" / "model.onnx").is_file():
        optimize_path(w / "fused", "bf16{mode=target}", w / "fused-bf16mode", submodels=["unet"])
    stages["bf16mode_s"] = round(time.perf_counter() - t0, 1)
    lat = args.size // 8
    shapes = [{"sample": (1, 4, lat, lat), "timestep": (1,), "encoder_hidden_states": (1, 77, 768)}]
    plan = {"ov-fp32": (args.src, "fp32"), "native-fp32": (w / "fused", "fp32"),
            "ov-bf16": (args.src, "bf16"), "native-bf16-mode": (w / "fused-bf16mode", None),
            "native-bf16-precise": (w / "fused-bf16mode", None)}
    feeds = _feeds(args.size)
    manifests: dict = {}
    times: dict[str, list[float]] = {r: [] for r in ROWS}
    outputs: dict[str, dict[str, np.ndarray]] = {}
    # two phases (fp32 pair, bf16 rows) so that at most three full-size compiled UNets are in memory
    for pair in (ROWS[:2], ROWS[2:]):
        runners = {}
        for row in pair:
            src, prec = plan[row]
            art = w / f"art-{row}-{args.size}"
            if not (art / "sdgraph.json").is_file():
                lower(src, "openvino", art, precision=prec, shapes=shapes, submodels=["unet"],
                      options={"blob": "false", **OPTIONS.get(row, {})}, cache=False, force=True)
            a = load_artifact(art)
            runners[row], manifests[row] = a.runner("unet"), a.manifest["submodels"]["unet"]
            runners[row](_fit(runners[row], feeds))  # warm-up call
        for _ in range(args.rounds):
            for row in pair:
                f = _fit(runners[row], feeds)
                t = time.perf_counter()
                out = runners[row](f)
                times[row].append(time.perf_counter() - t)
                outputs[row] = {k: np.array(v, dtype=np.float32) for k, v in out.items()}
        del runners, a
        stages[f"{pair[0]}_pair_done_s"] = round(time.perf_counter() - t0, 1)
    med = {r: statistics.median(v) for r, v in times.items()}
    flags = cpu_flags(lambda f: f.startswith(("avx512", "amx")))
    result = {
        "size": args.size, "rounds": args.rounds, "stages": stages, "cpu_flags": flags,
        "ms": {r: round(m * 1e3, 1) for r, m in med.items()},
        "calls_ms": {r: [round(x * 1e3, 1) for x in v] for r, v in times.items()},
        "native_vs_ov_fp32": round(med["native-fp32"] / med["ov-fp32"], 3),
        "bf16_mode_vs_ov_bf16": round(med["native-bf16-mode"] / med["ov-bf16"], 3),
        "bf16_precise_vs_ov_bf16": round(med["native-bf16-precise"] / med["ov-bf16"], 3),
        "vs_ov_fp32": {r: _compare(outputs[r], outputs["ov-fp32"]) for r in ROWS if r != "ov-fp32"},
        "native_ops": manifests["native-fp32"].get("native"),
        "precision_mode": manifests["native-bf16-mode"].get("precision_mode"),
        "precision_mode_precise": manifests["native-bf16-precise"].get("precision_mode"),
    }
    if args.profile:
        result["profile_ms"] = {row: _profile(w / f"art-{row}-{args.size}") for row in ROWS}
    emit_report(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
