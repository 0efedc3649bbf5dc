"""Where a command reads and writes when the user names no source or no output."""

from __future__ import annotations

from pathlib import Path

from sdgraph.errors import InputError
from sdgraph.ir.io import DATA_SUFFIX
from sdgraph.ir.modeldir import GRAPH, ModelDir
from sdgraph.manifest import MANIFEST

__all__ = ["default_output", "default_source"]


def default_output(src: Path, kind: str, force: bool = False) -> Path:
    """The output beside ``src`` when ``-o`` is omitted; never one that exists already.

    A model file ``unet.onnx`` -> ``unet.<kind>.onnx`` (its weights beside it)
    when the output is a model (``kind`` "opt"), else the folder ``unet-<kind>/``; a folder or model
    directory ``sd15/`` -> ``sd15-<kind>/`` beside it. With ``force`` an existing one is replaced.
    """
    src = Path(src)
    if src.is_file() and kind == "opt":
        out = src.with_name(f"{src.stem}.{kind}{src.suffix or '.onnx'}")
        taken = [p for p in (out, out.with_name(out.name + DATA_SUFFIX)) if p.exists() or p.is_symlink()]
    else:
        base = src.resolve() if src.name in ("", ".", "..") else src
        out = base.with_name(f"{base.stem if base.is_file() else base.name}-{kind}")
        taken = [out] if out.exists() or out.is_symlink() else []
    if taken and not force:
        raise InputError(f"{taken[0]} exists: the default output would replace it; pass -o PATH (or --force to replace it)")
    return out


def default_source(cwd: Path | None = None) -> Path:
    """The model a command takes when run with no source: the model directory it is run in.

    That is the current folder when it holds ``sdgraph.json``, ``model.onnx`` or submodel folders,
    else the one ``.onnx`` file in it (``unet.opt.onnx`` when it sits beside the ``unet.onnx`` it
    was optimized from).
    """
    explicit = cwd is not None
    cwd = Path(cwd) if explicit else Path.cwd()
    if (cwd / MANIFEST).is_file() or (cwd / GRAPH).is_file() or ModelDir.is_model_dir(cwd):
        return cwd if explicit else Path(".")
    files = sorted(cwd.glob("*.onnx"))
    optimized = [f for f in files if f.name.endswith(".opt.onnx")]
    if len(files) == 2 and len(optimized) == 1 and cwd / optimized[0].name.replace(".opt.onnx", ".onnx") in files:
        return optimized[0] if explicit else Path(optimized[0].name)  # `optimize unet.onnx` wrote unet.opt.onnx beside it: that is the one to go on with
    if len(files) == 1:
        return files[0] if explicit else Path(files[0].name)
    what = f"{len(files)} .onnx files" if files else "no model"
    raise InputError(f"{cwd}: {what} here; name the model (a .onnx file or a model directory) or run this in its folder")
