"""Runs a Neural Engine IR inside the engine's own environment; sdgraph's NeuralEngineRunner drives it as a subprocess.

One shot:  python -P ne_worker.py IR_DIR IN.npz OUT.npz [--warmup N] [--iters N] [--inputs JSON_LIST]
Probe:     python -P ne_worker.py --probe   (imports the runtime, prints numpy's version: what doctor checks)
Serving:   python -P ne_worker.py IR_DIR --serve   (loads the model once, then one JSON request per stdin line:
           {"in": IN.npz, "out": OUT.npz, "warmup": N, "iters": N, "inputs": [...]} -> one JSON reply line)
Needs only numpy, pyyaml and intel-extension-for-transformers 1.4.2 (no sdgraph import: it runs in .venv-ne;
-P keeps this folder, which holds torch.py and openvino.py targets, off sys.path).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["main", "infer"]


def _output_names(conf: Path) -> list[str]:
    import yaml

    ops = yaml.safe_load(conf.read_text())["model"]["operator"]
    return [name for op in ops.values() if op.get("type") == "Output" for name in op.get("input", {})]


def infer(model, out_names: list[str], src: Path, dst: Path, names: list[str], warmup: int, iters: int) -> list[float]:
    with np.load(src) as z:
        names = names or list(z.files)
        # the IR declares integer inputs as s32 (token ids, timesteps)
        feeds = [np.ascontiguousarray(z[n].astype(np.int32) if z[n].dtype == np.int64 else z[n]) for n in names]
    outs, times = None, []
    for _ in range(max(warmup, 0)):
        model.forward(feeds)
    for _ in range(max(iters, 1)):
        t0 = time.perf_counter()
        outs = model.forward(feeds)
        times.append(time.perf_counter() - t0)
    np.savez(dst, __times__=np.array(times), **{n: np.array(o) for n, o in zip(out_names, outs)})
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ir_dir", type=Path, nargs="?")
    ap.add_argument("inputs_npz", type=Path, nargs="?")
    ap.add_argument("outputs_npz", type=Path, nargs="?")
    ap.add_argument("--serve", action="store_true")
    ap.add_argument("--probe", action="store_true", help="import the runtime and print numpy's version")
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--iters", type=int, default=1)
    ap.add_argument("--inputs", default="[]", help="input names in IR order (JSON list)")
    args = ap.parse_args(argv)
    from intel_extension_for_transformers import neural_engine_py as ne

    if args.probe:
        print(np.__version__)
        return 0
    if args.ir_dir is None:
        ap.error("IR_DIR is required")
    conf, weights = args.ir_dir / "conf.yaml", args.ir_dir / "model.bin"
    t0 = time.perf_counter()
    model = ne.Model(str(conf), str(weights))
    load_s = time.perf_counter() - t0
    out_names = _output_names(conf)
    if not args.serve:
        infer(model, out_names, args.inputs_npz, args.outputs_npz, json.loads(args.inputs), args.warmup, args.iters)
        return 0
    print(json.dumps({"ready": True, "load_s": load_s}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            times = infer(model, out_names, Path(req["in"]), Path(req["out"]), req.get("inputs", []),
                          int(req.get("warmup", 0)), int(req.get("iters", 1)))
            reply = {"ok": True, "times": times}
        except Exception as exc:  # one bad request must not kill the served model
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
