"""The ``sdgraph.json`` manifest of model and artifact directories: provenance, shapes, hashes."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from sdgraph.errors import InputError

__all__ = ["MANIFEST", "read_manifest", "write_manifest", "file_hash", "package_versions", "SUBMODELS"]

MANIFEST = "sdgraph.json"
# Submodel folders of a model directory (optimum's ONNX layout), in pipeline order.
SUBMODELS = ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder")
_PACKAGES = ("sdgraph", "onnx", "onnxruntime", "onnx-graphsurgeon", "numpy", "torch", "diffusers",
             "transformers", "openvino", "onnxscript", "onnxsim")


def read_manifest(directory: str | os.PathLike, required: bool = False) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        if required:
            raise InputError(f"{directory}: no {MANIFEST} (not an sdgraph model or artifact directory)")
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable manifest ({exc})") from None


def write_manifest(directory: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Write the manifest atomically (temporary name, then rename)."""
    path = Path(directory) / MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def _json_default(o: Any):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def file_hash(path: str | os.PathLike, chunk: int = 16 << 20) -> str:
    """sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return "sha256:" + h.hexdigest()


def package_versions(names: tuple[str, ...] = _PACKAGES) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out
