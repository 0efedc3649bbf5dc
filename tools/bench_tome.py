"""Benchmark the tome pass on a full-size SD1.5-architecture UNet (random weights), one process.

Exports the UNet (torch.onnx.export, legacy exporter, opset 17, static shapes) at the requested
latent size once, applies ``tome{ratio=R}`` for each ratio, and times one UNet call side by side,
alternating calls without and with ToMe so that load drift on a shared machine hits both:
ONNX Runtime and OpenVINO (fp32) without and with ToMe, plus PyTorch eager with and without
tomesd at ratio 0.5. Graph variants are written beside the exported weights (graph file only,
weights shared). Run under ``flock /tmp/sdgraph-heavy.lock``.

With ``--fuse`` the ONNX Runtime rows compare ``fold,fa,gn,geglu`` + ``ort-contrib`` against
``fold,tome{ratio=R},fa,gn,geglu`` + ``ort-contrib``: attention runs in ORT's MultiHeadAttention
kernel, which does not materialise the [B, heads, N, N] scores. That is what makes 1024 px fit in
memory (unfused: 8.6 GB of scores per tensor at batch 1); the variants are written to their own
folders (3.4 GB each, one on disk at a time). OpenVINO needs no such help: its CPU plugin fuses the
exported MatMul-Softmax-MatMul into its own SDPA kernel (measured: one 1024 px block, batch 1, runs
in 1.0 GB). Every graph variant is built in a child process, so the pass's copy of the 3.4 GB
model never stays in the measuring process (the first 1024 px run was OOM-killed at 15.7 GB).

    python tools/bench_tome.py --px 512 --batch 2 --repeat 3 --work /tmp/tome-bench
    python tools/bench_tome.py --px 1024 --batch 1 --repeat 2 --fuse --work /tmp/tome-bench
    python tools/bench_tome.py --px 1024 --batch 1 --fuse --profile 0.5     # ORT seconds per op type
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _unet(size: str = "full", seed: int = 0):
    import torch
    from diffusers import UNet2DConditionModel

    from sdgraph.demo import _UNET

    torch.manual_seed(seed)
    return UNet2DConditionModel(**_UNET[("sd15", size)]).eval()


def _feeds(batch: int, lat: int, ctx: int = 768) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "sample": rng.standard_normal((batch, 4, lat, lat)).astype(np.float32),
        "timestep": np.array([500.0], dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, 77, ctx)).astype(np.float32),
    }


def export(unet, path: Path, feeds: dict[str, np.ndarray]) -> None:
    import torch

    class Wrap(torch.nn.Module):
        def __init__(self, u):
            super().__init__()
            self.u = u

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.u(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    path.parent.mkdir(parents=True, exist_ok=True)
    args = tuple(torch.from_numpy(feeds[k]) for k in ("sample", "timestep", "encoder_hidden_states"))
    with torch.no_grad():
        torch.onnx.export(Wrap(unet), args, str(path), input_names=list(feeds), output_names=["out_sample"],
                          opset_version=17, dynamo=False)


def export_block(path: Path, batch: int, tokens: int) -> dict[str, np.ndarray]:
    """One SD1.5 full-resolution transformer block (dim 320, 8 heads, GEGLU, context 768)."""
    import torch
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(0)
    blk = BasicTransformerBlock(320, 8, 40, cross_attention_dim=768, activation_fn="geglu").eval()
    feeds = {"hidden": torch.randn(batch, tokens, 320).numpy(), "ctx": torch.randn(batch, 77, 768).numpy()}

    class Wrap(torch.nn.Module):
        def __init__(self, b):
            super().__init__()
            self.b = b

        def forward(self, hidden, ctx):
            return self.b(hidden, encoder_hidden_states=ctx)

    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(Wrap(blk), (torch.from_numpy(feeds["hidden"]), torch.from_numpy(feeds["ctx"])), str(path),
                          input_names=["hidden", "ctx"], output_names=["out"], opset_version=17, dynamo=False)
    return feeds


def _tome(ratio: float, opts: str) -> str:
    return f"tome{{ratio={ratio}{' ' + opts if opts else ''}}}"


def tome_variant(base: Path, ratio: float, opts: str = "") -> tuple[Path, dict]:
    """Apply tome{ratio [opts]}, inline its functions (OpenVINO reads none) and write the graph only,
    beside the base model's weights."""
    import onnx
    import onnx.inliner

    from sdgraph.ir.model import Model
    from sdgraph.passes.manager import PassManager

    m = Model.load(base)
    stats = PassManager(_tome(ratio, opts)).run(m).records[-1].stats
    proto = onnx.inliner.inline_local_functions(m.to_proto())
    tag = "".join(ch for ch in opts if ch.isalnum())
    out = base.parent / f"tome{ratio}{tag}_inl.onnx"
    onnx.save(proto, str(out))
    return out, stats


def fused_variant(base: Path, ratio: float | None, opts: str = "") -> tuple[Path, dict]:
    """``fold,[tome{ratio [opts]},]fa,gn,geglu`` then ``ort-contrib``, saved in a folder of its own."""
    from sdgraph.ir.model import Model
    from sdgraph.passes.manager import PassManager

    tome = _tome(ratio, opts) + "," if ratio else ""
    m = Model.load(base)
    rep = PassManager(f"fold,{tome}fa,gn,geglu").run(m)
    PassManager("ort-contrib").run(m)
    out = m.save(base.parent.parent / f"{base.parent.name}_fused_{ratio or 'base'}", force=True)
    stats = {r.name: r.stats for r in rep.records}
    fused = {r.name: f"{r.matched}/{r.expected}" for r in rep.records if r.expected is not None}
    return out, {"blocks_merged": stats.get("tome", {}).get("blocks_merged"), "fused": fused}


def build(kind: str, base: Path, ratio: float | None, opts: str = "") -> tuple[Path, dict]:
    """Build a variant (``tome`` or ``fused``) in a child process; returns its path and stats."""
    spec = json.dumps(dict(kind=kind, base=str(base), ratio=ratio, opts=opts))
    proc = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"building {kind} {ratio} failed (rc {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    path, stats = json.loads(lines[-1][len("RESULT "):])
    return Path(path), stats


def _child(spec: str) -> int:
    d = json.loads(spec)
    base, ratio = Path(d["base"]), d["ratio"]
    if d["kind"] == "fused":
        path, stats = fused_variant(base, ratio, d["opts"])
    else:
        path, stats = tome_variant(base, ratio, d["opts"])
    print("RESULT " + json.dumps([str(path), stats]), flush=True)
    return 0


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(base_fn, var_fn, repeat: int) -> tuple[float, float]:
    """Medians of base and variant calls taken alternately, so machine-load drift hits both."""
    tb, tv = [], []
    for _ in range(repeat):
        tb.append(_timed(base_fn))
        tv.append(_timed(var_fn))
    return statistics.median(tb), statistics.median(tv)


def ort_runner(path: Path, feeds):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    out = sess.run(None, feeds)[0]  # also the warm-up
    return (lambda: sess.run(None, feeds)), out


def ort_profile(path: Path, feeds) -> dict[str, float]:
    """Seconds per op type in one ORT call after a warm-up call (ORT's own profiler)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    so.enable_profiling = True
    so.profile_file_prefix = str(path.parent / "ort_profile")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    sess.run(None, feeds)
    sess.run(None, feeds)
    events = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    per_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= max(runs):
            op = e["args"]["op_name"]
            per_op[op] = per_op.get(op, 0.0) + e["dur"] / 1e6
    return per_op


def ov_runner(path: Path, feeds):
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 2})
    req = compiled.create_infer_request()
    out = np.array(req.infer(feeds)[compiled.outputs[0]])
    return (lambda: req.infer(feeds)), out


def torch_runner(unet, feeds, ratio: float | None):
    """A callable running eager torch; with ``ratio``, tomesd is patched in for each call."""
    import tomesd
    import torch

    torch.set_num_threads(2)
    args = tuple(torch.from_numpy(feeds[k]) for k in ("sample", "timestep", "encoder_hidden_states"))

    def call():
        if ratio:
            tomesd.apply_patch(unet, ratio=ratio, use_rand=False)
        try:
            with torch.no_grad():
                return unet(*args, return_dict=False)[0]
        finally:
            if ratio:
                tomesd.remove_patch(unet)

    return call, call().numpy()


def cosine(a, b) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def profile(base: Path, feeds, ratio: float, json_out: str | None, fuse: bool, opts: str = "") -> int:
    """Where the time goes: ORT seconds per op type without and with ToMe, one call each."""
    times = {}
    for label, r in (("no ToMe", None), (f"tome {ratio}", ratio)):
        if fuse:
            path, _ = build("fused", base, r, opts)
        else:
            path = base if r is None else build("tome", base, r, opts)[0]
        times[label] = ort_profile(path, feeds)
        if fuse:
            shutil.rmtree(path.parent, ignore_errors=True)
        gc.collect()
    (b, v) = times.values()
    ops = sorted(set(b) | set(v), key=lambda o: -max(b.get(o, 0), v.get(o, 0)))
    print(f"| op type | s no ToMe | s {list(times)[1]} | saved s |")
    print("| --- | ---: | ---: | ---: |")
    for op in ops:
        if max(b.get(op, 0), v.get(op, 0)) >= 0.05:
            print(f"| {op} | {b.get(op, 0):.2f} | {v.get(op, 0):.2f} | {b.get(op, 0) - v.get(op, 0):+.2f} |")
    print(f"| total (kernels) | {sum(b.values()):.2f} | {sum(v.values()):.2f} | {sum(b.values()) - sum(v.values()):+.2f} |")
    if json_out:
        Path(json_out).write_text(json.dumps(times, indent=2))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--px", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ratios", default="0.3,0.5,0.6")
    ap.add_argument("--engines", default="ort,ov,torch")
    ap.add_argument("--work", default="/tmp/tome-bench")
    ap.add_argument("--json", default=None)
    ap.add_argument("--size", default="full", choices=("full", "tiny"), help="tiny: smoke-test the harness")
    ap.add_argument("--block", action="store_true", help="time one full-resolution transformer block, not the UNet")
    ap.add_argument("--fuse", action="store_true",
                    help="ORT rows: fold,fa,gn,geglu + ort-contrib with and without tome (memory-safe at 1024 px)")
    ap.add_argument("--profile", type=float, default=None, metavar="RATIO",
                    help="only profile one ORT call per op type, without ToMe and with tome at RATIO (--fuse graphs)")
    ap.add_argument("--tome-options", default="", help="more tome options, e.g. 'mlp=true crossattn=true'")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return _child(a.child)
    lat = a.px // 8
    if a.block:
        unet = None
        base = Path(a.work) / f"block_{a.px}_b{a.batch}" / "model.onnx"
        feeds = export_block(base, a.batch, lat * lat)
        a.engines = a.engines.replace("torch", "")
    else:
        unet = _unet(a.size)
        feeds = _feeds(a.batch, lat, unet.config.cross_attention_dim)
        base = Path(a.work) / f"unet_{a.size}_{a.px}_b{a.batch}" / "model.onnx"
    if not base.exists():
        t0 = time.perf_counter()
        export(unet, base, feeds)
        print(f"exported {base} in {time.perf_counter() - t0:.0f} s", flush=True)
    unet = None  # 3.4 GB at full size: rebuilt (same seed, same weights) for the torch rows
    gc.collect()
    if a.profile:
        return profile(base, feeds, a.profile, a.json, fuse=a.fuse, opts=a.tome_options)
    engines = a.engines.split(",")
    ratios = [float(r) for r in a.ratios.split(",")]
    rows = []
    made: list[Path] = []
    tome_graphs: dict[float, tuple[Path, dict]] = {}  # graph-only variants, shared by ORT and OpenVINO
    for engine in ("ort", "ov"):
        if engine not in engines:
            continue
        make = ort_runner if engine == "ort" else ov_runner
        fuse = a.fuse and engine == "ort"
        if fuse:
            t0 = time.perf_counter()
            base_path, _ = build("fused", base, None)
            made.append(base_path.parent)
            print(f"fused base in {time.perf_counter() - t0:.0f} s", flush=True)
        else:
            base_path = base
        base_fn, ref = make(base_path, feeds)
        for r in ratios:
            if fuse:
                path, stats = build("fused", base, r, a.tome_options)
            else:
                if r not in tome_graphs:
                    tome_graphs[r] = build("tome", base, r, a.tome_options)
                path, stats = tome_graphs[r]
            var_fn, out = make(path, feeds)
            tb, tv = interleaved(base_fn, var_fn, a.repeat)
            rows.append(dict(engine=engine + (" fused" if fuse else ""), variant=_tome(r, a.tome_options), base_seconds=tb, seconds=tv, speedup=tb / tv,
                             cosine=cosine(ref, out), blocks=stats["blocks_merged"], fused=stats.get("fused")))
            print(rows[-1], flush=True)
            del var_fn
            gc.collect()
            if fuse:  # 3.4 GB each: keep one variant on disk at a time
                shutil.rmtree(path.parent, ignore_errors=True)
        del base_fn
        gc.collect()
    if "torch" in engines:
        unet = _unet(a.size)
        base_fn, ref = torch_runner(unet, feeds, None)
        var_fn, out = torch_runner(unet, feeds, 0.5)
        tb, tv = interleaved(base_fn, var_fn, a.repeat)
        rows.append(dict(engine="torch eager", variant="tomesd ratio 0.5", base_seconds=tb, seconds=tv,
                         speedup=tb / tv, cosine=cosine(ref, out)))
        print(rows[-1], flush=True)
    for d in made:
        shutil.rmtree(d, ignore_errors=True)
    print(f"\n({a.px} px, batch {a.batch}, median of {a.repeat} interleaved calls)")
    print("| engine | variant | s/call no ToMe | s/call with | speed-up | cosine vs no ToMe |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['engine']} | {row['variant']} | {row['base_seconds']:.2f} | {row['seconds']:.2f} "
              f"| {row['speedup']:.2f}x | {row['cosine']:.4f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(px=a.px, batch=a.batch, repeat=a.repeat, rows=rows), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
