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

__all__ = ["MANIFEST", "read_json_object", "read_manifest", "write_manifest", "file_hash", "package_versions"]

MANIFEST = "sdgraph.json"
_PACKAGES = ("sdgraph", "onnx", "onnxruntime", "onnx-graphsurgeon", "numpy", "torch", "diffusers",
             "transformers", "openvino", "onnxscript", "onnxsim")


def read_manifest(directory: str | os.PathLike, required: bool = False) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        if required:
            raise InputError(f"{directory}: no {MANIFEST} (not an sdgraph model or artifact directory)")
        return {}
    return read_json_object(path, "manifest")


def read_json_object(path: str | os.PathLike, what: str = "JSON file") -> dict[str, Any]:
    """A JSON file that must hold an object (a manifest, a config); anything else is bad input."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        why = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise InputError(f"{path}: unreadable {what} ({why})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: {what} must be a JSON object, not a {type(data).__name__}")
    return data


def read_yaml_object(path: str | os.PathLike, what: str = "YAML file") -> dict[str, Any]:
    """A YAML file that must hold a mapping (a tune space, a recipe); anything else is bad input."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such {what}")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as exc:
        why = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise InputError(f"{path}: not valid YAML ({why})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: {what} must be a YAML mapping, not a {type(data).__name__}")
    return data


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
