"""Benchmark todo (token downsampling) beside tome at the same token reduction, per UNet call, one process.

Full-size SD1.5-architecture UNet (random weights from diffusers' config, seed 0), exported once
(legacy exporter, opset 17, static shapes) at ``--px`` and ``--batch``. Three graphs over the same
fused pipeline, each built in a child process (the 3.4 GB model copy never stays in the measuring
process) and saved in its own folder:

    base  fold,fa,gn,geglu                    + ort-contrib
    tome  fold,tome{ratio=R},fa,gn,geglu      + ort-contrib
    todo  fold,todo{factor=F},fa,gn,geglu     + ort-contrib

``R`` defaults to 1 - 1/F² (factor 2: ratio 0.75), the same number of tokens removed from the
full-resolution self-attention (ToDo's paper compares ToMe at that ratio). ONNX Runtime (2 threads,
fp32, attention in its MultiHeadAttention kernel) runs base, tome and todo calls alternately
(base, tome, todo, base, ...) so that load drift hits all three; the medians and the ratios over
base are printed, with each output's cosine to base. ``--engines ort,ov`` adds OpenVINO on the same
graphs with canonical functions inlined (fp32 hint, 2 threads). Run under ``flock /tmp/sdgraph-heavy.lock``.

    python tools/bench_todo.py --px 512 --batch 1 --repeat 3 --work /tmp/todo-bench
    python tools/bench_todo.py --px 1024 --batch 1 --repeat 2 --work /tmp/todo-bench
    python tools/bench_todo.py --px 512 --extra "tome2=tome{max_downsample=2}"   # + tome at two resolutions
    python tools/bench_todo.py --block --px 1024 --repeat 5 --engines ort,ov   # one block: the effect's ceiling
    python tools/bench_todo.py --size tiny --px 128 --repeat 2       # smoke-test the harness
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


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tome import _feeds, _unet, cosine, export, export_block, ort_runner, ov_runner  # noqa: E402  (tools/ helpers)


EXTRA: dict[str, str] = {}  # --extra LABEL=SPEC: more graphs in the same alternation


def variants(factor: int, ratio: float) -> dict[str, str]:
    return {"base": "", "tome": f"tome{{ratio={ratio}}}", "todo": f"todo{{factor={factor}}}", **EXTRA}


def build_variant(base: Path, label: str, spec: str, ov: bool) -> tuple[Path, dict]:
    """``fold,[spec,]fa,gn,geglu`` + ``ort-contrib`` (ORT) or the same without ort-contrib, inlined (OpenVINO)."""
    from sdgraph.ir.canonical import inline_functions
    from sdgraph.ir.model import Model
    from sdgraph.passes.manager import PassManager

    m = Model.load(base)
    m.metadata.setdefault("sdgraph.role", "unet")  # a lone block: the token passes run on UNet graphs
    rep = PassManager(f"fold,{spec + ',' if spec else ''}fa,gn,geglu").run(m)
    if ov:
        inline_functions(m)
    else:
        PassManager("ort-contrib").run(m)
    out = m.save(base.parent.parent / f"{base.parent.name}_{label}{'_ov' if ov else ''}", force=True)
    stats = {r.name: {"stats": r.stats, "matched": f"{r.matched}/{r.expected}"} for r in rep.records
             if r.name in ("tome", "todo", "fa")}
    return out, stats


def build(base: Path, label: str, spec: str, ov: bool) -> tuple[Path, dict]:
    arg = json.dumps(dict(base=str(base), label=label, spec=spec, ov=ov))
    proc = subprocess.run([sys.executable, __file__, "--child", arg], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"building {label} failed (rc {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    path, stats = json.loads(lines[-1][len("RESULT "):])
    return Path(path), stats


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--px", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--factor", type=int, default=2)
    ap.add_argument("--ratio", type=float, default=None, help="tome ratio (default: 1 - 1/factor², the same reduction)")
    ap.add_argument("--engines", default="ort")
    ap.add_argument("--work", default="/tmp/todo-bench")
    ap.add_argument("--size", default="full", choices=("full", "tiny"))
    ap.add_argument("--json", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the variant folders")
    ap.add_argument("--block", action="store_true", help="one full-resolution SD1.5 transformer block, not the UNet")
    ap.add_argument("--extra", action="append", default=[], metavar="LABEL=SPEC",
                    help="another graph in the alternation, e.g. 'tome2=tome{max_downsample=2}'")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    for item in a.extra:
        label, _, spec = item.partition("=")
        EXTRA[label] = spec
    if a.child:
        d = json.loads(a.child)
        path, stats = build_variant(Path(d["base"]), d["label"], d["spec"], d["ov"])
        print("RESULT " + json.dumps([str(path), stats]), flush=True)
        return 0
    ratio = a.ratio if a.ratio is not None else round(1 - 1 / a.factor ** 2, 4)
    lat = a.px // 8
    if a.block:
        base = Path(a.work) / f"block_{a.px}_b{a.batch}" / "model.onnx"
        feeds = export_block(base, a.batch, lat * lat)  # cheap: re-exported for its feeds
    else:
        unet = _unet(a.size)
        feeds = _feeds(a.batch, lat, unet.config.cross_attention_dim)
        base = Path(a.work) / f"unet_{a.size}_{a.px}_b{a.batch}" / "model.onnx"
        if not base.exists():
            t0 = time.perf_counter()
            export(unet, base, feeds)
            print(f"exported {base} in {time.perf_counter() - t0:.0f} s", flush=True)
        unet = None
    gc.collect()
    rows = []
    for engine in a.engines.split(","):
        ov = engine == "ov"
        make = ov_runner if ov else ort_runner
        runs, outs, stats, made = {}, {}, {}, []
        for label, spec in variants(a.factor, ratio).items():
            t0 = time.perf_counter()
            path, stats[label] = build(base, label, spec, ov)
            made.append(path.parent)
            runs[label], outs[label] = make(path, feeds)
            print(f"{engine} {label}: built and warmed in {time.perf_counter() - t0:.0f} s {stats[label]}", flush=True)
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(a.repeat):
            for label, fn in runs.items():
                times[label].append(_timed(fn))
        med = {k: statistics.median(v) for k, v in times.items()}
        for label in runs:
            rows.append(dict(engine=engine, variant=label, spec=variants(a.factor, ratio)[label] or "(fusions only)",
                             seconds=med[label], calls=times[label], speedup=med["base"] / med[label],
                             cosine=cosine(outs["base"], outs[label]), stats=stats[label]))
            print(rows[-1], flush=True)
        runs.clear()
        gc.collect()
        if not a.keep:
            for d in made:
                shutil.rmtree(d, ignore_errors=True)
    what = "SD1.5 full-resolution transformer block" if a.block else f"{a.size} SD1.5 UNet"
    print(f"\n({what}, {a.px} px, batch {a.batch}, median of {a.repeat} alternated calls, "
          f"todo factor {a.factor} vs tome ratio {ratio})")
    print("| engine | graph | s/call | vs fused base | cosine vs fused base |")
    print("| --- | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['engine']} | {r['spec']} | {r['seconds']:.3f} | {r['speedup']:.2f}x | {r['cosine']:.5f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(px=a.px, batch=a.batch, repeat=a.repeat, factor=a.factor, ratio=ratio,
                                                rows=rows), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
