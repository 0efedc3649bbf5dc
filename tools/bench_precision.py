"""Benchmark qdq / bf16 on a full-size SD1.5-architecture UNet (random weights) at 512 px, one process.

Runs the real passes on ``DIR/unet/model.onnx`` (calibration from the pipeline's own text encoder
and scheduler), saves the INT8 and bf16 graphs, and times one UNet call (batch 2, 64x64 latents)
side by side, median of ``--repeat`` calls after one warm-up: ORT fp32 / INT8, OpenVINO fp32 /
INT8 / bf16 graph / its own bf16 mode on the original graph, and the torch target (eager, its own
ONNX->torch.fx emitter) fp32 and bf16 (autocast). Fidelity: cosine vs fp32 on held-back
calibration inputs. Run under ``flock /tmp/sdgraph-heavy.lock``.

    python tools/bench_precision.py /tmp/sdgraph-full/sd15-onnx --calib 8 --work /tmp/prec-bench
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def _size(model_file: Path) -> int:
    return sum(f.stat().st_size for f in model_file.parent.iterdir() if f.is_file() and f.name.startswith("model.onnx"))


def _timed(fn, feeds, repeat: int) -> tuple[float, list[float]]:
    fn(feeds)  # warm-up
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn(feeds)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), ts


def _ort(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return lambda f: sess.run(names, f)[0]


def _ov(path: Path, hint: str | None):
    import openvino as ov

    core = ov.Core()
    cfg = {"INFERENCE_PRECISION_HINT": hint} if hint else {}
    compiled = core.compile_model(core.read_model(str(path)), "CPU", cfg)
    out = compiled.outputs[0]
    return lambda f: compiled(f)[out]


def _torch(src: Path, work: Path, precision: str, threads: int):
    """Lower with the torch target (eager: no inductor compile) and return its UNet runner."""
    import torch

    from sdgraph.targets.driver import load_artifact, lower

    torch.set_num_threads(threads)
    out = work / f"torch-{precision}"
    if not out.exists():
        lower(src, "torch", out, precision=precision, options={"mode": "eager", "warmup": False}, cache=False, force=True)
    run = load_artifact(out).runner()
    return lambda f: next(iter(run(f).values()))


def _kv(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split())


def _cos(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/sdgraph-bench-precision"))
    ap.add_argument("--skip", default="", help="comma list of configs to skip")
    ap.add_argument("--qdq", default="", help="extra qdq options, KEY=VALUE space-separated (e.g. reduce_range=false)")
    ap.add_argument("--bf16", default="", help="extra bf16 options, KEY=VALUE space-separated (e.g. block_ops=Softmax)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from sdgraph.quant import calibration
    from sdgraph.ir.model import Model
    from sdgraph.passes.base import create_pass

    src = args.model_dir / "unet" / "model.onnx"
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict = {"calib": args.calib, "steps": args.steps, "repeat": args.repeat, "threads": args.threads}
    t0 = time.perf_counter()

    # held-back inputs: other prompts and noise than calibration (sdgraph.quant.calibration holdout=True)
    m = Model.load(src)
    held = calibration.calibration_feeds(m, 2, steps=args.steps, holdout=True)
    feeds = held[0]
    results["input_shapes"] = {k: list(v.shape) for k, v in feeds.items()}

    int8_file = args.work / "int8" / "model.onnx"
    if not int8_file.exists():
        t = time.perf_counter()
        opts = {"calib": args.calib, "steps": args.steps, "held_out": 2, **_kv(args.qdq)}
        results["qdq_options"] = opts
        p = create_pass("qdq", named=opts)
        res = p.run(m)
        results["qdq_seconds"] = round(time.perf_counter() - t, 1)
        results["qdq_stats"] = res.stats
        m.save(args.work / "int8", force=True)
    del m
    gc.collect()
    bf16_file = args.work / "bf16" / "model.onnx"
    if not bf16_file.exists():
        m = Model.load(src)
        t = time.perf_counter()
        opts = {"nan_scan": "false", **_kv(args.bf16)}
        results["bf16_options"] = opts
        res = create_pass("bf16", named=opts).run(m)
        results["bf16_seconds"] = round(time.perf_counter() - t, 1)
        results["bf16_stats"] = res.stats
        m.save(args.work / "bf16", force=True)
        del m
        gc.collect()
    results["sizes_mb"] = {k: round(_size(f) / 1e6, 1) for k, f in (("fp32", src), ("int8", int8_file), ("bf16", bf16_file))}

    configs = [
        ("ort_fp32", lambda: _ort(src, args.threads)),
        ("ort_int8", lambda: _ort(int8_file, args.threads)),
        ("ov_fp32", lambda: _ov(src, "f32")),
        ("ov_int8_f32", lambda: _ov(int8_file, "f32")),
        ("ov_bf16_mode", lambda: _ov(src, "bf16")),
        ("ov_bf16_graph", lambda: _ov(bf16_file, "bf16")),
        ("ov_int8_bf16", lambda: _ov(int8_file, "bf16")),
        ("torch_fp32", lambda: _torch(src, args.work, "fp32", args.threads)),
        ("torch_bf16", lambda: _torch(src, args.work, "bf16", args.threads)),
    ]
    skip = set(filter(None, args.skip.split(",")))
    refs: dict[str, list] = {}
    timing: dict = {}
    for name, make in configs:
        if name in skip:
            continue
        t = time.perf_counter()
        fn = make()
        load = time.perf_counter() - t
        med, ts = _timed(fn, feeds, args.repeat)
        outs = [fn(f) for f in held]
        if name in ("ort_fp32", "ov_fp32", "torch_fp32"):
            refs[name.split("_")[0]] = outs
        ref = refs.get("ort") or refs.get("ov")
        cos = min(_cos(r, o) for r, o in zip(ref, outs)) if ref else None
        timing[name] = {"median_s": round(med, 3), "calls_s": [round(x, 3) for x in ts], "load_s": round(load, 1),
                        "holdout_cosine_vs_fp32": None if cos is None else round(cos, 5)}
        print(name, timing[name], flush=True)
        del fn
        gc.collect()
    results["timing"] = timing
    r = {k: v["median_s"] for k, v in timing.items()}
    ratios = {}
    if "ort_fp32" in r and "ort_int8" in r:
        ratios["ort_int8_speedup"] = round(r["ort_fp32"] / r["ort_int8"], 3)
    if "ov_fp32" in r and "ov_int8_f32" in r:
        ratios["ov_int8_speedup_vs_f32"] = round(r["ov_fp32"] / r["ov_int8_f32"], 3)
    if "ov_bf16_mode" in r and "ov_int8_bf16" in r:
        ratios["ov_int8_bf16_speedup_vs_bf16_mode"] = round(r["ov_bf16_mode"] / r["ov_int8_bf16"], 3)
    if "torch_fp32" in r and "torch_bf16" in r:
        ratios["torch_bf16_speedup_vs_fp32"] = round(r["torch_fp32"] / r["torch_bf16"], 3)
    if "ov_bf16_mode" in r and "torch_bf16" in r:
        ratios["torch_bf16_time_vs_ov_bf16_mode"] = round(r["torch_bf16"] / r["ov_bf16_mode"], 3)
    if "ov_bf16_mode" in r and "ov_bf16_graph" in r:
        ratios["bf16_graph_time_vs_ov_bf16_mode"] = round(r["ov_bf16_graph"] / r["ov_bf16_mode"], 3)
    results["ratios"] = ratios
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    (args.work / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
