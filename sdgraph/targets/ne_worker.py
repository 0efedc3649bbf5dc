"""Runs a Neural Engine IR inside the engine's own environment; sdgraph's NeuralEngineRunner calls it as a subprocess.

Usage: python ne_worker.py IR_DIR IN.npz OUT.npz [--warmup N] [--iters N] [--inputs JSON_LIST]
Needs only numpy, pyyaml and intel-extension-for-transformers 1.4.2 (no sdgraph import: it runs in .venv-ne).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["main"]


def _output_names(conf: Path) -> list[str]:
    import yaml

    ops = yaml.safe_load(conf.read_text())["model"]["operator"]
    return [name for op in ops.values() if op.get("type") == "Output" for name in op.get("input", {})]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ir_dir", type=Path)
    ap.add_argument("inputs_npz", type=Path)
    ap.add_argument("outputs_npz", type=Path)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--iters", type=int, default=1)
    ap.add_argument("--inputs", default="[]", help="input names in IR order (JSON list)")
    args = ap.parse_args(argv)
    from intel_extension_for_transformers import neural_engine_py as ne

    conf, weights = args.ir_dir / "conf.yaml", args.ir_dir / "model.bin"
    model = ne.Model(str(conf), str(weights))
    with np.load(args.inputs_npz) as z:
        names = json.loads(args.inputs) or list(z.files)
        # the IR declares integer inputs as s32 (token ids, timesteps)
        feeds = [np.ascontiguousarray(z[n].astype(np.int32) if z[n].dtype == np.int64 else z[n]) for n in names]
    outs, times = None, []
    for _ in range(max(args.warmup, 0)):
        model.forward(feeds)
    for _ in range(max(args.iters, 1)):
        t0 = time.perf_counter()
        outs = model.forward(feeds)
        times.append(time.perf_counter() - t0)
    result = {n: np.array(o) for n, o in zip(_output_names(conf), outs)}
    np.savez(args.outputs_npz, __times__=np.array(times), **result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
