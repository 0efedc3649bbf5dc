"""Connecting to a Ray cluster for ``tune --ray`` and ``verify --ray``: one line for every way it fails.

Ray is optional (the ``tune`` extra). A task of ours requests a whole node's CPUs by default, so one
runs per node at a time and timings do not interfere; workers get the driver's ``PYTHONPATH`` and
``SDGRAPH_CACHE_DIR``, and read model and artifact dirs at the driver's paths (one machine, or a shared
file system).
"""

from __future__ import annotations

import importlib.util
import os
import socket

from sdgraph.errors import InputError, TargetUnavailable

__all__ = ["check_address", "connect", "node_cpus", "require_ray"]


def require_ray() -> None:
    if importlib.util.find_spec("ray") is None:
        raise TargetUnavailable("--ray needs Ray: pip install 'sdgraph[tune]'")


def check_address(address: str) -> None:
    """``HOST:PORT`` must accept a connection (3 s), so a wrong address is one line, not a long retry loop."""
    require_ray()
    if address == "auto":
        return
    host, _, port = address.rpartition(":")
    host = host.removeprefix("ray://") or "127.0.0.1"
    if not port.isdigit():
        raise InputError(f"--ray {address!r}: expected HOST:PORT of a Ray head, or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            pass
    except OSError as exc:
        raise InputError(f"--ray {address}: cannot reach a Ray head there ({exc.strerror or exc})") from None


def connect(address: str):
    """``ray``, initialized against the cluster at ``address`` (or ``auto``)."""
    check_address(address)
    import ray

    env = {k: os.environ[k] for k in ("PYTHONPATH", "SDGRAPH_CACHE_DIR") if os.environ.get(k)}
    try:
        ray.init(address=address, runtime_env={"env_vars": env} if env else None, logging_level="ERROR",
                 log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise InputError(f"--ray {address}: cannot connect ({str(exc).splitlines()[0][:200]})") from None
    return ray


def node_cpus(ray) -> tuple[int, int]:
    """(CPUs of the largest live node, CPUs of the cluster)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    per_node = max((int(n.get("Resources", {}).get("CPU", 0)) for n in nodes), default=1) or 1
    return per_node, int(ray.cluster_resources().get("CPU", per_node))
