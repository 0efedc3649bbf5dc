"""Where sdgraph keeps derived files: the lowering cache and the calibration cache live under one root."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """``$SDGRAPH_CACHE_DIR``, or ``~/.cache/sdgraph``."""
    env = os.environ.get("SDGRAPH_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "sdgraph"
