"""Shared by the benchmark scripts in tools/: the CPU's flags and the JSON report they print and write."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable

# The flags that matter for the figures (vector widths, bf16/fp16/int8 instructions, AMX).
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "avx512_fp16")


def cpu_flags(keep: Iterable[str] | Callable[[str], bool] = FLAGS) -> list[str]:
    """The CPU's flags from /proc/cpuinfo: those in ``keep`` (in its order), or those ``keep(flag)`` accepts (sorted)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    have = set(line.split(":", 1)[-1].split())
    if callable(keep):
        return sorted(f for f in have if keep(f))
    return [f for f in keep if f in have]


def emit_report(report: dict[str, Any], path: Path | None) -> None:
    """Print the report as indented JSON, and write it to ``path`` when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if path:
        Path(path).write_text(text + "\n")


def demo_export(work: Path, size: str, px: int | None = None) -> Path:
    """The random-weight SD1.5 demo pipeline of ``size`` built and exported under ``work`` (reused when there)."""
    from sdgraph.demo import build_demo_pipeline
    from sdgraph.export import export_pipeline

    pipe, onnx_dir = Path(work) / f"sd15-{size}", Path(work) / f"sd15-{size}-onnx"
    if not (pipe / "model_index.json").is_file():
        build_demo_pipeline(pipe, "sd15", size, seed=0)
    if not (onnx_dir / "sdgraph.json").is_file():
        export_pipeline(pipe, onnx_dir, **({"height": px, "width": px} if px else {}))
    return onnx_dir
