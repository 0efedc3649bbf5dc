"""Where calibration finds its material: the pipeline folder around a submodel, prompts, the cache."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from sdgraph.errors import InputError
from sdgraph.ir.modeldir import ModelDir
from sdgraph.paths import cache_dir as cache_root

__all__ = ["cache_dir", "model_dir", "load_prompts", "need", "NO_SOURCE_HINT"]

# What a user can do when a submodel has no pipeline folder around it.
NO_SOURCE_HINT = "pass calib_data=FILE.npz or run on a model directory"


def cache_dir() -> Path:
    """Where calibration inputs and ranges are cached: ``calib/`` in sdgraph's cache (``$SDGRAPH_CACHE_DIR``)."""
    return cache_root() / "calib"


def model_dir(model) -> Path:
    """The pipeline directory a submodel belongs to: ``DIR/unet/model.onnx`` -> ``DIR``."""
    if model.path is None:
        raise InputError(f"calibration needs the model's pipeline directory, but this model was not loaded from a file "
                         f"({NO_SOURCE_HINT})")
    return ModelDir.around(model.path)


def load_prompts(prompt_file: str | os.PathLike | None = None) -> list[str]:
    """Prompts from ``prompt_file`` (one a line, ``#`` comments) or sdgraph's shipped list."""
    if prompt_file:
        p = Path(prompt_file)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise InputError(f"{p}: cannot read the prompt file ({exc.strerror})") from None
    else:
        text = resources.files("sdgraph").joinpath("data/prompts.txt").read_text(encoding="utf-8")
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise InputError(f"{prompt_file or 'prompts.txt'}: no prompts in the file")
    return prompts


def need(directory: Path, sub: str, role: str, what: str, hint: str = NO_SOURCE_HINT) -> Path:
    """``directory/sub``, or one error line naming what is missing and what to do instead."""
    p = directory / sub
    if not p.exists():
        raise InputError(f"calibrating the {role} needs {what} at {p}, which is missing ({hint})")
    return p
