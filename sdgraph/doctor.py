"""What is usable on this machine: optional packages, tools and targets, each with a reason."""

from __future__ import annotations

import importlib
import shutil
from importlib import metadata

__all__ = ["checks"]

_OPTIONAL = (
    ("torch", "export", "torch==2.13.0 (export and the torch target)"),
    ("diffusers", "export", "pipelines for export and demo-model"),
    ("transformers", "export", "CLIP text encoders and tokenizers"),
    ("onnxscript", "export", "torch's dynamo exporter"),
    ("onnxsim", "simplify", "the simplify pass"),
    ("openvino", "openvino", "the openvino target"),
    ("matplotlib", "plot", "bench plots"),
    ("tomesd", "dev", "ToMe reference tests"),
)


def _package(name: str) -> tuple[bool, str]:
    try:
        importlib.import_module(name)
    except Exception as exc:  # ImportError, or a broken install raising anything
        return False, f"not importable ({type(exc).__name__})"
    try:
        return True, metadata.version(name)
    except metadata.PackageNotFoundError:
        return True, "installed"


def checks() -> list[tuple[str, bool, str]]:
    rows = []
    for mod, extra, what in _OPTIONAL:
        ok, detail = _package(mod)
        rows.append((f"package {mod}", ok, f"{detail}; {what}" + ("" if ok else f"; pip install 'sdgraph[{extra}]'")))
    atc = shutil.which("atc")
    rows.append(("tool atc (Ascend CANN)", atc is not None, atc or "not on PATH: Ascend targets write convert.sh instead"))
    try:
        from sdgraph.targets.neural_engine import neural_engine_status

        ok, why = neural_engine_status()
        rows.append(("Neural Engine runtime env", ok, why))
    except ImportError:
        pass
    from sdgraph.targets.base import targets

    for name, cls in targets().items():
        try:
            ok, why = cls().available()
        except Exception as exc:  # a target's probe must not break doctor
            ok, why = False, f"{type(exc).__name__}: {exc}"
        rows.append((f"target {name}", ok, why or cls.summary))
    return rows
