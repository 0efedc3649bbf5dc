"""Progress of long steps: the one abstraction library code reports to, and its implementations.

Library code calls, and knows nothing else::

    from sdgraph import progress

    with progress.task("denoising", total=steps) as p:
        for t in timesteps:
            ...
            p.advance()

    for name in progress.track(names, "export"):   # the same, over an iterable
        ...

What happens is decided by the reporter installed for the process (:func:`install`, :func:`using`):
``NULL`` by default (nothing is drawn, nothing costs), :class:`RichReporter` (bars on a rich console,
on stderr, installed by the command line only when stderr is a terminal and neither ``-q`` nor
``--json`` was given, see :func:`for_console`), or :class:`Recorder` (every task's total and advances,
for tests). This module is the only one outside ``sdgraph.cli`` that imports rich, and only inside
:class:`RichReporter`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from typing import Any, Iterable, Iterator, TypeVar

__all__ = ["Task", "Reporter", "NULL", "Recorder", "RichReporter", "task", "track", "install", "using", "current",
           "for_console", "ENV"]

T = TypeVar("T")

ENV = "SDGRAPH_PROGRESS"  # auto (default): bars when stderr is a terminal; always; never
_MODES = {"auto": "auto", "always": "always", "1": "always", "on": "always", "never": "never", "0": "never",
          "off": "never"}


class Task:
    """One step being reported: :meth:`advance` it, or :meth:`update` what it says. This one does nothing."""

    def advance(self, n: float = 1) -> None:
        pass

    def update(self, *, description: str | None = None, total: float | None = None,
               completed: float | None = None) -> None:
        pass


class Reporter:
    """Where tasks go. This base is the null reporter: its tasks do nothing."""

    @contextlib.contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[Task]:
        yield Task()


NULL = Reporter()
_current: Reporter = NULL
_lock = threading.Lock()


def current() -> Reporter:
    return _current


def install(reporter: Reporter | None) -> Reporter:
    """Make ``reporter`` (None: ``NULL``) the process's reporter; return the one it replaces."""
    global _current
    with _lock:
        previous, _current = _current, reporter or NULL
    return previous


@contextlib.contextmanager
def using(reporter: Reporter | None) -> Iterator[Reporter]:
    """``reporter`` for the duration of the block (None: leave the current one)."""
    if reporter is None:
        yield _current
        return
    previous = install(reporter)
    try:
        yield reporter
    finally:
        install(previous)


def task(description: str, total: float | None = None):
    """A context manager yielding a :class:`Task` of the current reporter."""
    return _current.task(description, total)


def track(items: Iterable[T], description: str, total: float | None = None) -> Iterator[T]:
    """Yield ``items``, advancing one task by one after each item's work (``continue`` included)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with task(description, total) as t:
        for item in items:
            yield item
            t.advance()


# -- recording (tests) -------------------------------------------------------------------------
@dataclasses.dataclass
class Recorded(Task):
    """A finished or running task as a :class:`Recorder` saw it."""

    description: str
    total: float | None
    advances: int = 0
    completed: float = 0
    descriptions: list[str] = dataclasses.field(default_factory=list)
    closed: bool = False

    def advance(self, n: float = 1) -> None:
        self.advances += 1
        self.completed += n

    def update(self, *, description: str | None = None, total: float | None = None,
               completed: float | None = None) -> None:
        if description is not None:
            self.descriptions.append(description)
        if total is not None:
            self.total = total
        if completed is not None:
            self.completed = completed


class Recorder(Reporter):
    """Keeps every task: ``recorder.tasks`` in the order they started."""

    def __init__(self) -> None:
        self.tasks: list[Recorded] = []

    @contextlib.contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[Task]:
        rec = Recorded(description, total)
        with _lock:
            self.tasks.append(rec)
        try:
            yield rec
        finally:
            rec.closed = True

    def named(self, description: str) -> list[Recorded]:
        return [t for t in self.tasks if t.description == description]


# -- rich bars (the command line) ---------------------------------------------------------------
class _RichTask(Task):
    def __init__(self, bar, task_id) -> None:
        self._bar, self._id = bar, task_id

    def advance(self, n: float = 1) -> None:
        self._bar.advance(self._id, n)

    def update(self, *, description: str | None = None, total: float | None = None,
               completed: float | None = None) -> None:
        kw: dict[str, Any] = {}
        if description is not None:
            kw["description"] = description
        if total is not None:
            kw["total"] = total
        if completed is not None:
            kw["completed"] = completed
        self._bar.update(self._id, **kw)


class RichReporter(Reporter):
    """Bars on ``console`` (a rich Console on stderr): one live display while any task runs.

    Nested tasks (each denoising run inside a bench) show under their parent. On a terminal a task's
    bar goes when it ends and the display is cleared when the last one does, so only the command's
    own lines stay; on anything else (``SDGRAPH_PROGRESS=always`` into a file or pipe) nothing moves
    and each bar's final state is printed once, when the last task ends.
    """

    def __init__(self, console) -> None:
        self.console = console
        self._bar = None
        self._open = 0

    @contextlib.contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[Task]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        terminal = self.console.is_terminal
        with _lock:
            if self._bar is None:
                self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=self.console, transient=terminal,
                                     redirect_stdout=False)  # stdout stays the command's (JSON, tables)
                self._bar.start()
            bar = self._bar
            task_id = bar.add_task(description, total=total)
            self._open += 1
        try:
            yield _RichTask(bar, task_id)
        finally:
            with _lock:
                self._open -= 1
                if terminal:
                    bar.remove_task(task_id)
                if self._open == 0:
                    self._bar = None
                    bar.stop()


def for_console(console, *, enabled: bool = True) -> Reporter | None:
    """The reporter a command line wants on ``console`` (stderr), or None to leave the current one.

    ``$SDGRAPH_PROGRESS``: ``auto`` (default) draws bars when ``console`` is a terminal, ``always``
    also into files and pipes, ``never`` never. ``enabled=False`` (``-q``, ``--json``) draws none.
    """
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in _MODES:
        from sdgraph.errors import UsageError

        raise UsageError(f"${ENV}={mode!r}: expected auto, always or never")
    if not enabled or _MODES[mode] == "never":
        return None
    if _MODES[mode] == "always" or console.is_terminal:
        return RichReporter(console)
    return None
