"""A model directory: one folder per submodel graph, the pipeline's other files, the ``sdgraph.json`` manifest.

One class owns what every command needs to know about such a folder (export, optimize, lower, run,
bench, calibration): which submodels it holds and in what order, the checked ``--submodels``
selection, the files that are not submodels (tokenizer, scheduler, configs), copying those safely,
and writing a new one through the atomic commit of :mod:`sdgraph.ir.outputs`.

The submodels are the Stable Diffusion roles in pipeline order (:data:`SUBMODELS`), each followed by
its variants: the extra graph folders the manifest names under ``"variants"`` (``{"unet_shallow":
{"of": "unet", ...}}``, written by ``deepcache``; :mod:`sdgraph.schedule` says when each runs). A
submodel is present when ``<name>/model.onnx`` is a file. ``--submodels`` selects roles; a variant
goes with its role. A folder is a model directory when it holds no ``model.onnx`` itself and at least
one role is present (detection never reads the manifest).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

from sdgraph.errors import InputError, UsageError
from sdgraph.ir.io import copy_inside
from sdgraph.ir.outputs import atomic_dir, guard_output
from sdgraph.manifest import MANIFEST, read_manifest, write_manifest
from sdgraph.schedule import variants_of

__all__ = ["GRAPH", "SUBMODELS", "VARIANTS", "ModelDir"]

# Submodel folders of a model directory (optimum's ONNX layout), in pipeline order.
SUBMODELS = ("text_encoder", "text_encoder_2", "controlnet", "unet", "vae_encoder", "vae_decoder")
GRAPH = "model.onnx"  # the graph file inside each submodel folder
VARIANTS = "variants"  # manifest key: extra graph folders (UNet variants): name -> {"of": SUBMODEL, ...}
_FOLDER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class ModelDir:
    """A model directory at ``path`` (shown in messages as given). ``ModelDir.open`` checks it is one."""

    def __init__(self, path: str | os.PathLike, manifest: dict[str, Any] | None = None):
        self.path = Path(path)
        self._manifest = manifest

    def __repr__(self) -> str:
        return f"ModelDir({str(self.path)!r})"

    # -- detection ---------------------------------------------------------------------------------
    @staticmethod
    def is_model_dir(path: str | os.PathLike) -> bool:
        """A folder with no ``model.onnx`` of its own and at least one Stable Diffusion submodel graph."""
        p = Path(path)
        return p.is_dir() and not (p / GRAPH).is_file() and any((p / s / GRAPH).is_file() for s in SUBMODELS)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "ModelDir":
        """The model directory at ``path``; one InputError line when it is not one."""
        p = Path(path)
        if not cls.is_model_dir(p):
            if not p.exists():
                raise InputError(f"{p}: no such file or directory")
            raise InputError(f"{p}: not a model directory (no <submodel>/{GRAPH} for any of {', '.join(SUBMODELS)})")
        return cls(p)

    @classmethod
    def around(cls, graph: str | os.PathLike) -> Path:
        """The pipeline folder a submodel graph belongs to: ``DIR/unet/model.onnx`` -> ``DIR``;
        a graph outside a submodel folder -> its own folder."""
        parent = Path(graph).resolve().parent
        if parent.name in SUBMODELS:
            return parent.parent
        if cls.is_model_dir(parent.parent) and parent.name in cls(parent.parent).variants:
            return parent.parent
        return parent

    # -- the manifest ------------------------------------------------------------------------------
    @property
    def manifest(self) -> dict[str, Any]:
        """The ``sdgraph.json`` manifest ({} when there is none); read once."""
        if self._manifest is None:
            self._manifest = read_manifest(self.path)
        return self._manifest

    def write_manifest(self, data: dict[str, Any]) -> Path:
        """Write ``data`` as this folder's manifest (atomically) and keep it as :attr:`manifest`."""
        self._manifest = data
        return write_manifest(self.path, data)

    @property
    def variants(self) -> dict[str, str]:
        """The variant folders the manifest names under ``"variants"``: name -> the submodel it is a variant of."""
        raw = self.manifest.get(VARIANTS)
        if raw is None:
            return {}
        variants_of(self.manifest, "")  # checks every entry (an object with "of"), one line otherwise
        bad = [n for n in raw if not _FOLDER_NAME.fullmatch(n) or n in SUBMODELS]
        if bad:
            raise InputError(f"{self.path / MANIFEST}: the variant {bad[0]!r} is not a folder name of its own "
                             f"(letters, digits, '_', '.', '-'; not a role)")
        return {n: str(e["of"]) for n, e in raw.items()}

    def variants_of(self, base: str) -> list[str]:
        """The variants of submodel ``base``, sorted (present or not)."""
        return sorted(n for n, of in self.variants.items() if of == base)

    # -- submodels ---------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Every submodel name this folder may hold: the roles in pipeline order, each followed by its variants."""
        variants = self.variants
        names = [n for s in SUBMODELS for n in (s, *self.variants_of(s))]
        return names + sorted(n for n, of in variants.items() if of not in SUBMODELS)

    @property
    def submodels(self) -> list[str]:
        """Every graph present (``<name>/model.onnx`` is a file): roles and variants, in :attr:`names` order."""
        return [s for s in self.names if (self.path / s / GRAPH).is_file()]

    @property
    def roles(self) -> list[str]:
        """The Stable Diffusion roles present, in pipeline order (what ``--submodels`` selects from)."""
        return [s for s in SUBMODELS if (self.path / s / GRAPH).is_file()]

    def model_path(self, name: str) -> Path:
        """``<dir>/<name>/model.onnx``."""
        return self.path / name / GRAPH

    def select(self, wanted: Iterable[str] | None, option: str = "--submodels") -> list[str]:
        """The roles to work on: all present ones, or ``wanted`` (checked; a UsageError naming the
        missing ones and what the folder has), in pipeline order. Variants go with their role."""
        names = self.roles
        if not wanted:
            return names
        wanted = [w.strip() for w in wanted]
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise UsageError(f"{option}: {self.path} has no submodel {', '.join(map(repr, unknown))} (has {', '.join(names)})")
        return [n for n in names if n in wanted]

    # -- the other files ---------------------------------------------------------------------------
    def assets(self) -> list[Path]:
        """What is not a present submodel nor the manifest (tokenizer, scheduler, configs ...), sorted."""
        skip = set(self.submodels) | {MANIFEST}
        return [p for p in sorted(self.path.iterdir()) if p.name not in skip]

    def copy_assets_to(self, dst: str | os.PathLike) -> list[Path]:
        """Copy :meth:`assets` into the folder ``dst`` without leaving this folder (symlinks resolved
        inside it only; FIFOs and devices refused: :func:`sdgraph.ir.io.copy_inside`). Returns the copies."""
        dst = Path(dst)
        copied = []
        for item in self.assets():
            copy_inside(item, dst / item.name, self.path)
            copied.append(dst / item.name)
        return copied

    # -- writing a new one -------------------------------------------------------------------------
    @classmethod
    @contextlib.contextmanager
    def create(cls, path: str | os.PathLike, force: bool = False,
               inputs: Iterable[str | os.PathLike] = ()) -> Iterator["ModelDir"]:
        """Write a new model directory at ``path``: yields a ModelDir on a temporary sibling that
        replaces ``path`` in one commit when the body succeeds (:func:`sdgraph.ir.outputs.atomic_dir`),
        and is removed when it raises. ``inputs`` are checked first with the output guard (an output
        that is, contains or lies inside an input is refused); an existing non-empty ``path`` is
        replaced only with ``force``.
        """
        inputs = list(inputs)
        if inputs:
            guard_output(path, inputs, force=force)
        with atomic_dir(path, force=force) as tmp:
            yield cls(tmp, manifest={})
