"""Fusion benchmark: full-size SD1.5-architecture UNet on ORT / OpenVINO fp32, exported vs sdgraph graphs.

Usage (run under the heavy-job lock; everything is timed side by side in this one process):

    flock /tmp/sdgraph-heavy.lock .venv/bin/python tools/bench_fusions.py [UNET.onnx] [--calls 3] [--out DIR]

Rows: exported graph on ORT; fold,fa,gn,geglu (canonical functions, ORT inlines them) on ORT;
the same + ort-contrib (MHA, contrib Gelu) on ORT; ONNX Runtime's transformers optimizer
(model_type unet, CPU-safe options) on ORT; OpenVINO fp32 on the exported and the sdgraph graph.
Also a micro-benchmark of one SD attention (body vs com.microsoft MHA vs opset-23 Attention).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

CANDIDATES = ["/tmp/sdgraph-full/sd15-onnx/unet/model.onnx"]


def feeds(size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    lat = size // 8
    return {"sample": rng.standard_normal((1, 4, lat, lat), dtype=np.float32),
            "timestep": np.array([999.0], dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((1, 77, 768), dtype=np.float32)}


def fit_feeds(names_types, f):
    out = {}
    for name, dtype in names_types:
        v = f[name]
        out[name] = v.astype(dtype) if v.dtype != dtype else v
    return out


def timed(fn, calls: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    ts = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), ts


def ort_runner(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    types = [(i.name, np.float32 if "float" in i.type else np.int64) for i in sess.get_inputs()]
    return lambda f: sess.run(None, fit_feeds(types, f))[0]


def ov_runner(path: Path):
    """OpenVINO fp32; canonical ai.sdgraph functions are inlined first (OV reads no model-local
    functions), and inputs are fed by position (OV may rename a folded input)."""
    import openvino as ov

    from sdgraph.ir.canonical import inline_functions
    from sdgraph.ir.model import Model

    m = Model.load(path)
    if m.functions:
        inline_functions(m)
        path = m.save(path.parent.parent / (path.parent.name + "-inlined"), force=True)
    core = ov.Core()
    model = core.read_model(str(path))
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    req = compiled.create_infer_request()
    dtypes = [p.get_element_type().to_dtype() for p in compiled.inputs]

    def run(f):
        req.infer({i: v.astype(dt) for i, (v, dt) in enumerate(zip(f.values(), dtypes))})
        return req.get_output_tensor(0).data.copy()

    return run


def attention_micro(calls: int) -> dict:
    """One SD1.5 attention at 512 px (8 heads, 4096 tokens, head dim 40): self and cross."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    res = {}
    rng = np.random.default_rng(0)
    for kind, sk in (("self", 4096), ("cross", 77)):
        h, s, d = 8, 4096, 40
        q = rng.standard_normal((1, s, h * d), dtype=np.float32)
        k = rng.standard_normal((1, sk, h * d), dtype=np.float32)
        v = rng.standard_normal((1, sk, h * d), dtype=np.float32)
        vi = lambda n, shape: helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)  # noqa: E731
        ins = [vi("q", [1, s, h * d]), vi("k", [1, sk, h * d]), vi("v", [1, sk, h * d])]
        outs = [vi("y", [1, s, h * d])]
        shp = helper.make_tensor("shp", TensorProto.INT64, [4], [1, -1, h, d])
        flat = helper.make_tensor("flat", TensorProto.INT64, [3], [1, -1, h * d])
        sc = helper.make_tensor("sc", TensorProto.FLOAT, [], [d ** -0.5])
        body = [
            helper.make_node("Reshape", ["q", "shp"], ["q4"]), helper.make_node("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", ["k", "shp"], ["k4"]), helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
            helper.make_node("Reshape", ["v", "shp"], ["v4"]), helper.make_node("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3]),
            helper.make_node("MatMul", ["qt", "kt"], ["s"]), helper.make_node("Mul", ["s", "sc"], ["ss"]),
            helper.make_node("Softmax", ["ss"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "vt"], ["o"]),
            helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]), helper.make_node("Reshape", ["ot", "flat"], ["y"]),
        ]
        graphs = {
            "function body (MatMul/Softmax/MatMul)": (helper.make_graph(body, "b", ins, outs, [shp, flat, sc]), [("", 17)]),
            "com.microsoft MultiHeadAttention": (helper.make_graph(
                [helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft", num_heads=h, scale=d ** -0.5)],
                "m", ins, outs), [("", 17), ("com.microsoft", 1)]),
            "ONNX Attention (opset 23)": (helper.make_graph(
                [helper.make_node("Attention", ["q", "k", "v"], ["y"], q_num_heads=h, kv_num_heads=h, scale=d ** -0.5)],
                "a", ins, outs), [("", 23)]),
        }
        row = {}
        ref = None
        for name, (g, ops) in graphs.items():
            try:
                m = helper.make_model(g, opset_imports=[helper.make_opsetid(dm, vv) for dm, vv in ops])
                m.ir_version = 10
                sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                fn = lambda: sess.run(None, {"q": q, "k": k, "v": v})[0]  # noqa: E731
                out = fn()
                ref = out if ref is None else ref
                med, _ = timed(fn, calls)
                row[name] = {"ms": round(med * 1e3, 2), "max_abs_vs_body": float(np.abs(out - ref).max())}
            except Exception as exc:  # record what happens, keep going
                row[name] = {"error": str(exc).splitlines()[0][:200]}
        res[kind] = row
    return res


def transformers_optimizer(src: Path, out_dir: Path) -> tuple[Path | None, str]:
    try:
        from onnxruntime.transformers import optimizer
        from onnxruntime.transformers.fusion_options import FusionOptions

        opts = FusionOptions("unet")
        opts.enable_nhwc_conv = False  # NhwcConv does not run on the CPU provider
        opts.enable_group_norm = False  # contrib GroupNorm is CUDA-only
        opts.enable_bias_splitgelu = False
        opts.enable_packed_qkv = False
        opts.enable_packed_kv = False
        opts.enable_bias_add = False
        m = optimizer.optimize_model(str(src), model_type="unet", num_heads=0, hidden_size=0, opt_level=0,
                                     optimization_options=opts, use_gpu=False)
        counts = m.get_fused_operator_statistics()
        out = out_dir / "ortopt.onnx"
        m.save_model_to_file(str(out), use_external_data_format=True)
        return out, f"fused: {json.dumps({k: v for k, v in counts.items() if v})}"
    except Exception as exc:
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]} (at {Path(tb.filename).name}:{tb.lineno} {tb.name})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("unet", nargs="?")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--sizes", default="512,256")
    ap.add_argument("--out", default=None, help="write results JSON here")
    ap.add_argument("--skip", default="", help="comma list of rows to skip (ortopt, ov)")
    args = ap.parse_args()
    src = Path(args.unet) if args.unet else next((Path(c) for c in CANDIDATES if Path(c).exists()), None)
    if src is None:
        print("no full-size UNet found; export one first", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.sizes.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    from sdgraph.ir.model import Model
    from sdgraph.passes.manager import PassManager

    results: dict = {"unet": str(src), "calls": args.calls, "rows": {}, "notes": {}}
    work = Path(tempfile.mkdtemp(prefix="sdgraph-bench-fusions-", dir="/tmp"))
    t = time.perf_counter()
    m = Model.load(src)
    rep = PassManager("fold,fa,gn,geglu", strict=True).run(m)
    results["notes"]["fusion"] = {r.name: {"expected": r.expected, "matched": r.matched, "stats": r.stats} for r in rep.records}
    canon = m.save(work / "canonical", force=True)
    m2 = Model.load(canon)
    rep2 = PassManager("ort-contrib").run(m2)
    lowered = m2.save(work / "lowered", force=True)
    results["notes"]["lowering"] = rep2.records[0].stats
    results["notes"]["optimize_seconds"] = round(time.perf_counter() - t, 1)
    del m, m2
    gc.collect()
    print("optimized in", results["notes"]["optimize_seconds"], "s:", results["notes"], flush=True)

    rows = [("ORT, exported graph", ort_runner, src), ("ORT, sdgraph fold,fa,gn,geglu", ort_runner, canon),
            ("ORT, sdgraph + ort-contrib", ort_runner, lowered)]
    if "ortopt" not in skip:
        path, note = transformers_optimizer(src, work)
        results["notes"]["ort_transformers_optimizer"] = note
        print("ORT transformers optimizer:", note, flush=True)
        if path is not None:
            rows.append(("ORT, transformers optimizer", ort_runner, path))
    if "ov" not in skip:
        rows += [("OpenVINO fp32, exported graph", ov_runner, src), ("OpenVINO fp32, sdgraph graph", ov_runner, canon)]
    ref = {}
    for name, make, path in rows:
        try:
            t = time.perf_counter()
            run = make(path)
            load_s = time.perf_counter() - t
        except Exception as exc:
            results["rows"][name] = {"error": str(exc).splitlines()[0][:200]}
            print(name, "FAILED to load:", results["rows"][name]["error"], flush=True)
            continue
        entry = {"load_s": round(load_s, 1)}
        for size in sizes:
            f = feeds(size)
            try:
                out = run(f)
                if size not in ref:
                    ref[size] = out
                err = float(np.abs(out - ref[size]).max() / (np.abs(ref[size]).max() + 1e-12))
                med, ts = timed(lambda: run(f), args.calls)  # noqa: F821 (run is bound above; deleted after the row)
                entry[str(size)] = {"median_s": round(med, 3), "calls_s": [round(x, 3) for x in ts], "max_rel_vs_first_row": err}
            except Exception as exc:
                entry[str(size)] = {"error": str(exc).splitlines()[0][:200]}
        results["rows"][name] = entry
        print(name, json.dumps(entry), flush=True)
        del run
        gc.collect()
    results["attention_micro"] = attention_micro(max(args.calls, 5))
    print("attention micro:", json.dumps(results["attention_micro"]), flush=True)
    for size in map(str, sizes):
        base = results["rows"].get("OpenVINO fp32, exported graph", {}).get(size, {}).get("median_s")
        ort0 = results["rows"].get("ORT, exported graph", {}).get(size, {}).get("median_s")
        for e in results["rows"].values():
            s = e.get(size, {}).get("median_s")
            if s:
                e[size]["vs_ort_exported"] = round(s / ort0, 3) if ort0 else None
                e[size]["vs_openvino_fp32"] = round(s / base, 3) if base else None
    import shutil

    shutil.rmtree(work, ignore_errors=True)  # the optimized copies are 3.4 GB each
    text = json.dumps(results, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
