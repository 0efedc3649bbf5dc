"""Run trials as Ray tasks: one trial per worker (a CPU request per task), results back to the driver.

The driver keeps the optuna study (asks, tells, storage); workers only run ``objective.run_trial``.
The model directory is read at its path when the workers see it (one machine, or a shared file
system); with ``ship=True`` it travels once through Ray's object store as a tar archive and each
worker unpacks it into its work folder.
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

from sdgraph.pipeline.ray_pool import connect, node_cpus

__all__ = ["RayExecutor"]


def _pack(model_dir: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(model_dir, arcname="model")
    return buf.getvalue()


def _remote_trial(model_dir: str, packed: bytes | None, config: Mapping[str, Any], settings: Mapping[str, Any]) -> dict:
    from sdgraph.pipeline.tune.objective import run_trial

    if packed is not None and not Path(model_dir, "sdgraph.json").is_file():
        root = Path(settings["work_dir"]) / "shipped"
        if not (root / "model" / "sdgraph.json").is_file():
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=root))
            with tarfile.open(fileobj=io.BytesIO(packed)) as tar:
                tar.extractall(tmp, filter="data")
            os.replace(tmp / "model", root / "model")
        model_dir = str(root / "model")
    return run_trial(model_dir, config, settings)


class RayExecutor:
    """``submit(job_id, config)`` then ``results()`` yields ``(job_id, result)`` as tasks finish."""

    def __init__(self, address: str, model_dir: str, settings: Mapping[str, Any], cpus_per_trial: int | None = None,
                 ship: bool = False):
        ray = connect(address)
        self._ray = ray
        per_node, total = node_cpus(ray)
        self.cpus = min(cpus_per_trial or per_node, per_node)  # default: one trial per node at a time
        self.slots = max(1, total // self.cpus)
        self.address = address
        self._model_dir, self._settings = model_dir, dict(settings)
        self._packed = ray.put(_pack(Path(model_dir))) if ship else None
        self._fn = ray.remote(num_cpus=self.cpus, max_retries=0)(_remote_trial)
        self._pending: dict[Any, Any] = {}

    def submit(self, job_id: Any, config: Mapping[str, Any], settings: Mapping[str, Any] | None = None) -> None:
        """``settings``: this trial's own (e.g. its time limit), instead of the executor's."""
        ref = self._fn.remote(self._model_dir, self._packed, dict(config), dict(settings or self._settings))
        self._pending[ref] = job_id

    def busy(self) -> int:
        return len(self._pending)

    def next_result(self) -> tuple[Any, dict[str, Any]]:
        ray = self._ray
        done, _ = ray.wait(list(self._pending), num_returns=1)
        job_id = self._pending.pop(done[0])
        try:
            return job_id, ray.get(done[0])
        except Exception as exc:  # noqa: BLE001 - a lost worker is a failed trial, not the end of the study
            msg = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
            return job_id, {"status": "failed", "error": f"ray: {msg}", "metrics": {}, "bench": {}, "verify": {},
                            "graph_sha256": {}, "seconds": {}, "stage": "ray"}

    def results(self) -> Iterator[tuple[Any, dict[str, Any]]]:
        while self._pending:
            yield self.next_result()

    def close(self) -> None:
        self._ray.shutdown()
