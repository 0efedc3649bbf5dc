"""Build the full-size random-weight demo pipeline and export it: the benchmark model for everyone.

    flock /tmp/sdgraph-heavy.lock .venv/bin/python tools/build_full_model.py [--arch sd15] [--out /tmp/sdgraph-full]

Writes OUT/<arch> (diffusers pipeline), OUT/<arch>-onnx (sdgraph export, legacy exporter),
OUT/<arch>-onnx.report.json (seconds and bytes per step and submodel) and finally OUT/READY.
An existing, complete pipeline or export is reused unless --rebuild.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sd15", choices=["sd15", "sd21", "sdxl", "pix2pix"])
    ap.add_argument("--out", default="/tmp/sdgraph-full", type=Path)
    ap.add_argument("--exporter", default="legacy", choices=["legacy", "dynamo"])
    ap.add_argument("--rebuild", action="store_true", help="rebuild the pipeline and the export even if present")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()

    from sdgraph.demo import build_demo_pipeline
    from sdgraph.export import export_pipeline

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "READY").unlink(missing_ok=True)
    pipe_dir = out / args.arch
    onnx_dir = out / (args.arch + "-onnx" + ("" if args.exporter == "legacy" else "-dynamo"))
    report: dict = {"arch": args.arch, "size": "full", "exporter": args.exporter}

    if args.rebuild or not (pipe_dir / "model_index.json").is_file():
        t0 = time.perf_counter()
        build_demo_pipeline(pipe_dir, args.arch, "full", seed=0, force=True)
        report["demo_seconds"] = round(time.perf_counter() - t0, 1)
    report["demo_bytes"] = _tree_bytes(pipe_dir)

    if args.rebuild or not (onnx_dir / "sdgraph.json").is_file():
        t0 = time.perf_counter()

        def progress(name: str, stage: str, step: int, steps: int) -> None:
            logging.info("%s: %s (%.0f s)", name, stage, time.perf_counter() - t0)

        manifest = export_pipeline(pipe_dir, onnx_dir, exporter=args.exporter, force=True, progress=progress)
        report["export_total_seconds"] = round(time.perf_counter() - t0, 1)
    else:
        manifest = json.loads((onnx_dir / "sdgraph.json").read_text())
    report["submodels"] = {
        name: {"nodes": s["nodes"], "parameters": s["parameters"], "bytes": s["bytes"],
               "export_seconds": s["export_seconds"], "max_rel": s["parity"]["worst"]["max_rel"],
               "cosine": s["parity"]["worst"]["cosine"]}
        for name, s in manifest["submodels"].items()
    }
    report["onnx_bytes"] = _tree_bytes(onnx_dir)
    (out / f"{onnx_dir.name}.report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "READY").write_text(f"{pipe_dir}\n{onnx_dir}\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
