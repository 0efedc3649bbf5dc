"""Instruments: hooks the manager calls around each pass (role gate, timing, graph dumps, printing)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import onnx_graphsurgeon as gs

from sdgraph.errors import InputError
from sdgraph.ir.model import Model
from sdgraph.passes.base import Pass

if TYPE_CHECKING:
    from sdgraph.passes.manager import PassRecord

__all__ = ["Instrument", "RoleGate", "Timing", "DumpDir", "PrintAfter", "graph_text"]


class Instrument:
    """Hooks around each pass (TVM's PassInstrument): gating, timing, dumps, printing.

    The manager calls, per pass: ``should_run`` (any reason string skips the pass), then
    ``before_pass``, the pass itself, ``after_run`` (the record holds the pass's result, nothing
    verified yet), and ``after_pass`` once the pass is verified and kept.
    """

    def should_run(self, index: int, p: Pass, model: Model) -> str | None:
        """None to run the pass, or the reason it is skipped."""
        return None

    def before_pass(self, index: int, p: Pass, model: Model) -> None:
        pass

    def after_run(self, index: int, p: Pass, model: Model, record: "PassRecord") -> None:
        pass

    def after_pass(self, index: int, p: Pass, model: Model, record: "PassRecord") -> None:
        pass


class RoleGate(Instrument):
    """Skip a pass whose ``roles`` do not include the model's role (e.g. qdq on a VAE)."""

    def should_run(self, index: int, p: Pass, model: Model) -> str | None:
        if p.roles is not None and model.role not in p.roles:
            return f"applies to {', '.join(p.roles)}, not {model.role}"
        return None


class Timing(Instrument):
    """``record.seconds``: the wall time of the pass itself (verification not included)."""

    def __init__(self) -> None:
        self._t0 = 0.0

    def before_pass(self, index: int, p: Pass, model: Model) -> None:
        self._t0 = time.perf_counter()

    def after_run(self, index: int, p: Pass, model: Model, record: "PassRecord") -> None:
        record.seconds = time.perf_counter() - self._t0


class DumpDir(Instrument):
    """Write the graph after each pass as ``NNN_<pass>.onnx`` (``000_input.onnx`` first)."""

    def __init__(self, directory: str | Path, force: bool = False, inputs: Iterable[Path] = ()):
        from sdgraph.ir.outputs import guard_output

        self.directory = Path(directory)
        guard_output(self.directory, list(inputs), force=force, what="dump folder")
        self.written: list[Path] = []

    def before_pass(self, index: int, p: Pass, model: Model) -> None:
        if index == 1:
            self._write(model, "000_input.onnx")

    def after_pass(self, index: int, p: Pass, model: Model, record: "PassRecord") -> None:
        self._write(model, f"{index:03d}_{p.name}.onnx")

    def _write(self, model: Model, filename: str) -> None:
        created = not self.directory.exists()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"{self.directory}: cannot create dump directory ({exc.strerror})") from None
        out = self.directory / filename
        m = model.copy()
        m.path = None
        try:
            m.save(out, force=True)  # the folder was guarded when the run started
        except BaseException:
            if created and not any(self.directory.iterdir()):
                self.directory.rmdir()  # leave no empty folder behind a failed first dump
            raise
        self.written.append(out)


class PrintAfter(Instrument):
    """Send a text view of the graph after the named passes (all when ``names`` is empty)."""

    def __init__(self, sink: Callable[[str], None], names: Iterable[str] = ()):
        self.sink = sink
        self.names = set(names)

    def after_pass(self, index: int, p: Pass, model: Model, record: "PassRecord") -> None:
        if self.names and p.name not in self.names:
            return
        self.sink(f"// after {index:03d} {p.spec()}\n{graph_text(model)}")


def graph_text(model: Model, limit: int = 400) -> str:
    """A compact printed graph: one line per node, ``outs = op(ins)``."""
    lines = [f"graph {model.name} ({model.num_nodes()} nodes)"]
    for i, node in enumerate(model.graph.nodes):
        if i == limit:
            lines.append(f"  ... {model.num_nodes() - limit} more nodes")
            break
        ins = ", ".join("%" + t.name if not isinstance(t, gs.Constant) else f"const{list(t.shape or [])}" for t in node.inputs)
        outs = ", ".join("%" + t.name for t in node.outputs)
        dom = f"{node.domain}::" if node.domain else ""
        lines.append(f"  {outs} = {dom}{node.op}({ins})")
    return "\n".join(lines)
