"""``recipe.yaml``: one configuration of ``sdgraph tune``, replayed exactly by ``sdgraph build``.

A recipe holds the canonical pipeline text, the submodels it ran on, the target, the precision, the
target options and the image size the shapes are derived from. ``build`` runs the same
``optimize_path`` and ``lower`` calls a trial ran, so the graphs come out byte-identical, and the
artifact's manifest names the recipe file and its sha256.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from sdgraph.errors import InputError

__all__ = ["RECIPE_VERSION", "recipe_text", "read_recipe", "build"]

RECIPE_VERSION = 1
_KEYS = ("pipeline", "submodels", "target", "precision", "options", "height", "width")


def recipe_text(config: Mapping[str, Any], settings: Mapping[str, Any], chosen_by: Mapping[str, Any]) -> str:
    import yaml

    data = {"sdgraph_recipe": RECIPE_VERSION, **{k: config.get(k) for k in ("pipeline", "submodels", "target", "precision")},
            "options": dict(config.get("options") or {}), "height": settings.get("height"), "width": settings.get("width"),
            "chosen_by": dict(chosen_by)}
    return ("# sdgraph recipe: replay with `sdgraph build MODEL_DIR --recipe THIS_FILE -o ARTIFACT`\n"
            + yaml.safe_dump(data, sort_keys=False, default_flow_style=False))


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    from sdgraph.manifest import read_yaml_object

    p = Path(path)
    data = read_yaml_object(p, "recipe file")
    if data.get("sdgraph_recipe") != RECIPE_VERSION:
        raise InputError(f"{p}: not an sdgraph recipe (sdgraph_recipe: {RECIPE_VERSION} missing)")
    if not isinstance(data.get("pipeline"), str) or not isinstance(data.get("target"), str):
        raise InputError(f"{p}: a recipe needs 'pipeline' (text) and 'target'")
    if not isinstance(data.get("options") or {}, dict):
        raise InputError(f"{p}: 'options' must be a mapping")
    subs = data.get("submodels")
    if subs is not None and not (isinstance(subs, list) and all(isinstance(s, str) for s in subs)):
        raise InputError(f"{p}: 'submodels' must be a list of names or null")
    return data


def build(model_dir: str | os.PathLike, recipe: str | os.PathLike, out: str | os.PathLike, *, force: bool = False,
          progress: Callable[[str], None] | None = None):
    """Optimize ``model_dir`` with the recipe's pipeline and lower it as the recipe says into ``out``."""
    from sdgraph.ir import outputs
    from sdgraph.manifest import file_hash
    from sdgraph.passes import parse_pipeline
    from sdgraph.passes.manager import optimize_path
    from sdgraph.targets.base import get_target
    from sdgraph.targets.driver import lower

    model_dir, out = Path(model_dir), Path(out)
    if not model_dir.is_dir():
        raise InputError(f"{model_dir}: no such model directory")
    r = read_recipe(recipe)
    parse_pipeline(r["pipeline"])  # unknown pass or option: exit 2 before any work
    get_target(r["target"]).require()
    outputs.guard_output(out, outputs.model_inputs(model_dir) + [Path(recipe)], force=force)
    parent = outputs.real_output(out).parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".sdgraph-build-", dir=parent))
    try:
        if progress:
            progress(f"optimize: {r['pipeline']}")
        optimize_path(model_dir, r["pipeline"], tmp / "opt", submodels=r.get("submodels"))
        note = {"recipe": {"path": str(Path(recipe).resolve()), "sha256": file_hash(recipe), "pipeline": r["pipeline"]}}
        return lower(tmp / "opt", r["target"], out, precision=r.get("precision"), options=r.get("options") or {},
                     height=r.get("height"), width=r.get("width"), force=force, progress=progress, annotations=note)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
