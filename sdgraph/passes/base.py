"""The pass contract: registered name, summary, typed options, requires → run → result check → ensures.

``Pass.__call__(model)`` enforces the contract itself (onnx-ir's PassBase does the same): the
manager only adds what spans passes (structural checks, numeric verification, rollback, instruments).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import importlib
import logging
import os
import pkgutil
from collections import Counter
from typing import Any, Callable, ClassVar

import onnx_graphsurgeon as gs

from sdgraph.errors import PassError, UsageError

__all__ = [
    "Option",
    "Options",
    "Pass",
    "PassResult",
    "Variant",
    "register",
    "registry",
    "get_pass",
    "create_pass",
    "parse_value",
    "graph_signature",
]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Option:
    """A typed pass option. ``type`` is bool, int, float, str or list (``a|b|c`` in text)."""

    name: str
    type: type
    default: Any
    help: str = ""
    positional: bool = False  # bound by ``name:VALUE`` in pipeline text
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None

    @property
    def py_type(self) -> Any:
        """The field type in the pass's option object (list options hold tuples: the object is immutable)."""
        t = tuple[str, ...] if self.type is list else self.type
        return t | None if self.default is None else t

    def describe(self) -> str:
        t = {list: "list", bool: "bool", int: "int", float: "float", str: "str"}.get(self.type, str(self.type))
        extra = f" one of {'|'.join(map(str, self.choices))}" if self.choices else ""
        return f"{self.name}: {t} = {format_value(self.default)}{extra}  {self.help}".rstrip()


def format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "|".join(format_value(x) for x in v)
    if v is None:
        return "none"
    if isinstance(v, float):
        return repr(v).rstrip("0").rstrip(".") if "e" not in repr(v) else repr(v)
    return str(v)


def format_element(name: str, changed: dict[str, Any], cls: type[Pass]) -> str:
    """One pass in pipeline text: ``name[:positional][{key=value ...}]`` with the options in ``changed``."""
    pos = next((o for o in cls.options if o.positional), None)
    text = name
    rest = dict(changed)
    if pos is not None and pos.name in rest:
        text += f":{format_value(rest.pop(pos.name))}"
    if rest:
        order = [o.name for o in cls.options if o.name in rest]
        text += "{" + " ".join(f"{k}={format_value(rest[k])}" for k in order) + "}"
    return text


def parse_value(opt: Option, raw: Any, pass_name: str) -> Any:
    """Convert text (or a Python value) to the option's type, with one clear error line."""
    def bad(why: str):
        return UsageError(f"pass {pass_name!r}: bad value {raw!r} for option {opt.name!r} ({why})")

    if opt.type is bool:
        if isinstance(raw, bool):
            val = raw
        elif str(raw).lower() in ("1", "true", "yes", "on"):
            val = True
        elif str(raw).lower() in ("0", "false", "no", "off"):
            val = False
        else:
            raise bad("expected true or false")
    elif opt.type is int:
        if isinstance(raw, bool):
            raise bad("expected an integer")
        try:
            val = int(raw) if not isinstance(raw, float) or raw.is_integer() else None
        except (TypeError, ValueError):
            val = None
        if val is None:
            raise bad("expected an integer")
    elif opt.type is float:
        try:
            val = float(raw)
        except (TypeError, ValueError):
            raise bad("expected a number") from None
        if not math.isfinite(val):
            raise bad("must be a finite number, not NaN or infinity")
    elif opt.type is list:
        if isinstance(raw, (list, tuple)):
            val = tuple(str(x) for x in raw)
        else:
            val = tuple(x for x in str(raw).split("|") if x)
    else:
        val = str(raw)
    if opt.choices is not None:
        items = val if isinstance(val, tuple) else [val]
        for item in items:
            if item not in opt.choices:
                raise bad(f"expected one of {', '.join(map(str, opt.choices))}")
    if opt.min is not None and isinstance(val, (int, float)) and val < opt.min:
        raise bad(f"must be >= {opt.min}")
    if opt.max is not None and isinstance(val, (int, float)) and val > opt.max:
        raise bad(f"must be <= {opt.max}")
    return val


@dataclasses.dataclass
class Variant:
    """A second graph a pass made from the one it ran on (``deepcache``'s shallow UNet).

    ``entry`` is its record in the model directory's manifest under ``"variants"`` (the manager
    adds ``"of"``: the submodel it was made from).
    """

    model: Any  # sdgraph.ir.model.Model
    entry: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PassResult:
    """What a pass did: whether the graph changed, and counts the pass kept itself.

    ``expected``/``matched`` are filled by pattern passes (e.g. Softmax count vs fused
    attentions); ``near_misses`` hold (node name, reason) pairs for ``--debug``.
    ``variants`` are extra named graphs (written as sibling submodel folders of a model
    directory), ``schedule`` the per-step schedule of the submodel and its variants
    (``sdgraph.schedule``), ``new_outputs`` graph outputs the pass added on purpose.
    """

    modified: bool
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    expected: int | None = None
    matched: int | None = None
    near_misses: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    variants: dict[str, Variant] = dataclasses.field(default_factory=dict)
    schedule: dict[str, Any] | None = None
    new_outputs: list[str] = dataclasses.field(default_factory=list)


class Options:
    """Base of every pass's option object: a frozen dataclass built from the pass's ``options``.

    ``Fold(max_growth=64).opts`` is a ``FoldOptions(max_growth=64, shapes=True)``: typed fields,
    immutable (assignment raises ``dataclasses.FrozenInstanceError``), list options held as tuples.
    """

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _freeze(opt: Option, value: Any) -> Any:
    return tuple(value) if opt.type is list and value is not None else value


def options_type(cls: type) -> type[Options]:
    """The frozen dataclass of ``cls``'s options (built once per class, not inherited)."""
    made = cls.__dict__.get("_options_type")
    if made is None:
        fields = [(o.name, o.py_type, dataclasses.field(default=_freeze(o, o.default))) for o in cls.options]
        made = dataclasses.make_dataclass(f"{cls.__name__}Options", fields, bases=(Options,), frozen=True)
        made.__module__ = cls.__module__
        cls._options_type = made
    return made


def graph_signature(model) -> Counter:
    """What the graph computes, as a multiset: (op, domain, input names, output names, attribute
    names) per live node (one the graph outputs depend on), plus the graph's inputs and outputs.
    Node names, node order and dead nodes do not count (naming, toposort and an export's cleanup
    are not changes); rewiring, adding or removing a live node, or a new constant does."""
    g = model.graph
    sig: Counter = Counter()
    seen: set[int] = set()
    stack = [t for t in g.outputs]
    while stack:
        t = stack.pop()
        for n in t.inputs if isinstance(t, gs.Variable) else ():
            if id(n) in seen:
                continue
            seen.add(id(n))
            sig[(n.op, n.domain or "", tuple(x.name for x in n.inputs), tuple(x.name for x in n.outputs),
                 tuple(sorted(n.attrs)))] += 1
            stack.extend(n.inputs)
    sig[("<io>", tuple(t.name for t in g.inputs), tuple(t.name for t in g.outputs))] += 1
    return sig


class Pass:
    """Base class for graph passes.

    Subclasses set ``name`` (short, registered), ``summary`` (one line), ``options`` (a tuple
    of Option, read back typed as ``self.opts.<name>``) and ``exact`` (True: outputs equal within
    ``rtol``/``atol``; False: approximate, reported as numbers and failing only under
    ``min_cosine`` when the user sets it). They implement ``run(model) -> PassResult`` and may
    override ``requires``/``ensures``, which raise PassError. Call the pass, ``p(model)``, to get
    the contract checked; ``run`` alone skips it.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    exact: ClassVar[bool] = True
    rtol: ClassVar[float] = 1e-4  # relative to the reference output's max magnitude
    roles: ClassVar[tuple[str, ...] | None] = None  # None: any submodel
    pattern: ClassVar[bool] = False  # reports expected vs matched

    def __init__(self, **kwargs: Any):
        known = {o.name: o for o in self.options}
        for key in kwargs:
            if key not in known:
                raise UsageError(
                    f"pass {self.name!r} has no option {key!r} (options: {', '.join(known) or 'none'})"
                )
        values = {k: _freeze(known[k], parse_value(known[k], v, self.name)) for k, v in kwargs.items()}
        self.opts = options_type(type(self))(**values)
        self.debug = False

    # -- the contract ----------------------------------------------------------------------
    def __call__(self, model) -> PassResult:
        """requires → run → result check → ensures, in place on ``model``.

        A failed pre- or post-condition raises PassError naming the pass (other SdgraphErrors a
        pass raises, e.g. TargetUnavailable, go through unchanged). ``run`` must return a
        PassResult, and one that says ``modified=False`` must leave ``graph_signature`` unchanged
        (the manager skips numeric verification for unmodified graphs, so that flag cannot lie).
        Nodes the pass left unnamed get ``<pass>_N`` names before ``ensures`` runs.
        """
        try:
            self.requires(model)
        except PassError as exc:
            raise PassError(f"pass {self.name!r} cannot run: {exc}") from None
        before = graph_signature(model)
        result = self.run(model)
        if not isinstance(result, PassResult):
            raise PassError(f"pass {self.name!r}: run() returned {type(result).__name__}, not PassResult")
        if not result.modified and graph_signature(model) != before:
            raise PassError(f"pass {self.name!r}: reported modified=False but changed the graph")
        model.name_unnamed_nodes(self.name)
        try:
            self.ensures(model)
        except PassError as exc:
            raise PassError(f"pass {self.name!r}: post-condition failed: {exc}") from None
        return result

    def requires(self, model) -> None:
        """Raise PassError if the model cannot be processed by this pass."""

    def run(self, model) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def ensures(self, model) -> None:
        """Raise PassError if a post-condition does not hold after run()."""

    def spec(self) -> str:
        """This pass in canonical pipeline text (only non-default options)."""
        changed = {o.name: getattr(self.opts, o.name) for o in self.options
                   if getattr(self.opts, o.name) != _freeze(o, o.default)}
        return format_element(self.name, changed, type(self))

    def __repr__(self) -> str:
        return f"<Pass {self.spec()}>"


_REGISTRY: dict[str, type[Pass]] = {}
_DISCOVERED = False


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: add a Pass subclass to the registry under ``cls.name``."""
    if not cls.name or not cls.summary:
        raise TypeError(f"{cls.__name__} needs a name and a one-line summary")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"pass name {cls.name!r} is registered twice")
    if sum(o.positional for o in cls.options) > 1:
        raise TypeError(f"{cls.__name__}: at most one positional option")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    """Import every module in sdgraph.passes so their @register decorators run."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    # This module's own folder: importing the package here would make base depend on its API.
    for info in pkgutil.iter_modules([os.path.dirname(__file__)]):
        if info.name.startswith("_") or info.name in ("base", "pipeline", "manager", "verifier", "instruments", "plugins"):
            continue
        importlib.import_module(f"sdgraph.passes.{info.name}")
    load_entry_points()  # installed packages' passes (entry-point group sdgraph.passes)


def registry() -> dict[str, type[Pass]]:
    _discover()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    reg = registry()
    if name not in reg:
        import difflib

        close = difflib.get_close_matches(name, list(reg), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"unknown pass {name!r}{hint} (see `sdgraph passes`)")
    return reg[name]


def create_pass(name: str, positional: Any = None, named: dict[str, Any] | None = None) -> Pass:
    cls = get_pass(name)
    kwargs = dict(named or {})
    if positional is not None:
        pos = [o for o in cls.options if o.positional]
        if not pos:
            raise UsageError(f"pass {name!r} takes no positional value (got {name}:{positional})")
        if pos[0].name in kwargs:
            raise UsageError(f"pass {name!r}: option {pos[0].name!r} given twice")
        kwargs[pos[0].name] = positional
    return cls(**kwargs)


Check = Callable[..., "str | None"]  # pattern checks return a reason string instead of False


# -- installed pass plugins (sdgraph/passes/plugins.py loads --plugin files) ------------------------
ENTRY_POINT_GROUP = "sdgraph.passes"


def plugin_error(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}".rstrip(": ")


def load_entry_points() -> list[str]:
    """Load every installed ``sdgraph.passes`` entry point: a module that registers passes, or a Pass class."""
    from importlib.metadata import entry_points

    names: list[str] = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        before = set(_REGISTRY)
        try:
            obj = ep.load()
            if inspect.isclass(obj) and issubclass(obj, Pass) and _REGISTRY.get(obj.name) is not obj:
                register(obj)
        except Exception as exc:
            dist = getattr(getattr(ep, "dist", None), "name", None)
            raise UsageError(f"entry point {ep.name!r} ({ep.value}{', from ' + dist if dist else ''}) in group "
                             f"{ENTRY_POINT_GROUP!r} cannot be loaded: {plugin_error(exc)}") from None
        names += sorted(set(_REGISTRY) - before)
    return names
