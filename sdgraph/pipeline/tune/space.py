"""The search space of ``sdgraph tune``: pass pipelines x targets x target options, read from YAML.

The default space is ``sdgraph/data/tune_space.yaml`` (its comments are the schema); ``--space FILE``
gives another. Loading checks every pass, option, target, precision and target option against the
registries, so a bad space is refused (exit 2) before any trial runs. A configuration is a plain dict
(``pipeline``, ``submodels``, ``target``, ``precision``, ``options``): it travels to Ray workers and
into ``recipe.yaml`` as is.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from sdgraph.errors import TargetUnavailable, UsageError

__all__ = ["Choice", "Space", "load_space", "config_key", "DEFAULT_SPACE"]

DEFAULT_SPACE = Path(__file__).resolve().parents[2] / "data" / "tune_space.yaml"
NONE = "none"


@dataclasses.dataclass(frozen=True)
class Choice:
    """One alternative of a stage: ``label`` (what the sampler picks), fixed text or one pass with value lists."""

    label: str
    text: str = ""  # pipeline text, "" for none
    pass_name: str = ""  # set when the choice samples option values
    values: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def pipeline(self, picked: Mapping[str, Any]) -> str:
        """Canonical pipeline text of this choice with the picked option values."""
        from sdgraph.passes import create_pass, format_pipeline, parse_pipeline

        if self.pass_name:
            return create_pass(self.pass_name, named={k: picked[k] for k, _ in self.values}).spec()
        return format_pipeline(parse_pipeline(self.text)) if self.text else ""


@dataclasses.dataclass
class Space:
    stages: list[tuple[str, list[Choice]]]
    targets: dict[str, dict[str, tuple[Any, ...]]]  # target -> key (precision or option) -> values
    submodels: list[str] | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    source: str = ""

    def sample(self, trial) -> dict[str, Any]:
        """One configuration, every value drawn from the optuna ``trial`` (in a fixed order: reproducible)."""
        parts = []
        for stage, choices in self.stages:
            labels = [c.label for c in choices]
            label = trial.suggest_categorical(f"stage.{stage}", labels) if len(labels) > 1 else labels[0]
            choice = choices[labels.index(label)]
            picked = {k: (trial.suggest_categorical(f"{stage}.{choice.pass_name}.{k}", list(v)) if len(v) > 1 else v[0])
                      for k, v in choice.values}
            text = choice.pipeline(picked)
            if text:
                parts.append(text)
        names = list(self.targets)
        target = trial.suggest_categorical("target", names) if len(names) > 1 else names[0]
        keys = self.targets[target]
        picked = {k: (trial.suggest_categorical(f"{target}.{k}", list(v)) if len(v) > 1 else v[0]) for k, v in keys.items()}
        precision = picked.pop("precision", None)
        return {"pipeline": ",".join(parts), "submodels": self.submodels, "target": target, "precision": precision,
                "options": picked}

    def size(self) -> int:
        n = 1
        for _, choices in self.stages:
            n *= sum(_product(len(v) for _, v in c.values) for c in choices)
        return n * sum(_product(len(v) for v in keys.values()) for keys in self.targets.values())

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "stages": {s: [c.label for c in cs] for s, cs in self.stages},
                "targets": {t: {k: list(v) for k, v in keys.items()} for t, keys in self.targets.items()},
                "submodels": self.submodels, "configurations": self.size(), "notes": self.notes}


def _product(xs) -> int:
    n = 1
    for x in xs:
        n *= x
    return n


def config_key(config: Mapping[str, Any]) -> str:
    """The identity of a configuration: two trials with the same key build the same artifact."""
    return json.dumps({k: config.get(k) for k in ("pipeline", "submodels", "target", "precision", "options")},
                      sort_keys=True, default=str)


def _values(raw: Any, where: str) -> tuple[Any, ...]:
    vals = tuple(raw) if isinstance(raw, list) else (raw,)
    if not vals or any(isinstance(v, (dict, list)) for v in vals):
        raise UsageError(f"{where}: expected a value or a non-empty list of values")
    return vals


def _pass_names(text: str) -> list[str]:
    from sdgraph.passes.pipeline import _parse_element, split_elements

    return [_parse_element(e, text)[0] for e in split_elements(text)]


def _stage(stage: str, raw: Any, optional: set[str], registered: set[str], notes: list[str], where: str) -> list[Choice]:
    from sdgraph.passes import create_pass, parse_pipeline

    if not isinstance(raw, list) or not raw:
        raise UsageError(f"{where}: stage {stage!r}: expected a non-empty list of choices")
    out: list[Choice] = []
    for item in raw:
        if item is None or item == NONE:
            out.append(Choice(NONE))
            continue
        if isinstance(item, str):
            missing = [n for n in _pass_names(item) if n not in registered]
            if missing and set(missing) <= optional:
                notes.append(f"stage {stage}: {item!r} left out ({', '.join(missing)} not installed)")
                continue
            try:
                parse_pipeline(item)  # unknown pass or bad option: UsageError naming it
            except UsageError as exc:
                raise UsageError(f"{where}: stage {stage!r}: {exc}") from None
            out.append(Choice(item, text=item))
            continue
        if isinstance(item, dict) and len(item) == 1:
            (name, opts), = item.items()
            opts = opts or {}
            if not isinstance(name, str) or not isinstance(opts, dict):
                raise UsageError(f"{where}: stage {stage!r}: a pass choice is {{PASS: {{OPTION: [values]}}}}")
            if name not in registered and name in optional:
                notes.append(f"stage {stage}: {name} left out (not installed)")
                continue
            if name not in registered:
                raise UsageError(f"{where}: stage {stage!r}: unknown pass {name!r} (see `sdgraph passes`)")
            values = tuple((str(k), _values(v, f"{where}: {stage}.{name}.{k}")) for k, v in opts.items())
            try:
                for k, vs in values:
                    for v in vs:
                        create_pass(name, named={k: v})
            except UsageError as exc:
                if name in optional:  # an optional pass whose options differ from this space's: leave it out
                    notes.append(f"stage {stage}: {name} left out ({exc})")
                    continue
                raise UsageError(f"{where}: {exc}") from None
            if not values:
                create_pass(name)
            out.append(Choice(name, pass_name=name, values=values))
            continue
        raise UsageError(f"{where}: stage {stage!r}: a choice is 'none', pipeline text or {{PASS: {{OPTION: [values]}}}}")
    labels = [c.label for c in out]
    if len(set(labels)) != len(labels):
        raise UsageError(f"{where}: stage {stage!r} names a choice twice")
    return out


def _targets(raw: Any, wanted: Sequence[str] | None, notes: list[str], where: str) -> dict[str, dict[str, tuple]]:
    from sdgraph.targets.base import get_target, targets

    known = targets()
    if not isinstance(raw, dict) or not raw:
        raise UsageError(f"{where}: 'targets' must map target names to {{precision: [...], OPTION: [...]}}")
    for name in list(raw) + list(wanted or []):
        if name not in known:
            raise UsageError(f"{where if name in raw else '--targets'}: unknown target {name!r} (see `sdgraph targets`)")
    out: dict[str, dict[str, tuple]] = {}
    for name in wanted or raw:
        tgt = get_target(name)
        ok, why = tgt.available()
        if not ok:
            if wanted:
                tgt.require()  # named on the command line: exit 3 naming the extra
            notes.append(f"target {name} left out: not usable here ({why})")
            continue
        keys = raw.get(name) or {}
        if not isinstance(keys, dict):
            raise UsageError(f"{where}: target {name!r}: expected {{precision: [...], OPTION: [...]}}")
        vals = {str(k): _values(v, f"{where}: {name}.{k}") for k, v in keys.items()}
        vals.setdefault("precision", (tgt.capability.precisions[0],))
        for p in vals["precision"]:
            if p not in tgt.capability.precisions:
                raise UsageError(f"{where}: target {name!r} does not take precision {p!r} "
                                 f"(takes {', '.join(tgt.capability.precisions)})")
        native = []
        for p in vals["precision"]:
            ok, why = tgt.precision_native(p)
            if ok:
                native.append(p)
            else:
                notes.append(f"target {name} precision {p} left out: {why}")
        if not native:
            continue
        vals["precision"] = tuple(native)
        for k, vs in vals.items():
            if k != "precision":
                for v in vs:
                    try:
                        tgt.parse_options({k: v})
                    except UsageError as exc:
                        raise UsageError(f"{where}: {exc}") from None
        out[name] = vals
    if not out:
        raise TargetUnavailable(f"{where}: none of the space's targets is usable here (see `sdgraph targets`)")
    return out


def load_space(path: str | os.PathLike | None = None, targets: Sequence[str] | None = None) -> Space:
    """The space of ``path`` (default: the shipped one), limited to ``targets`` when given."""
    from sdgraph.manifest import read_yaml_object
    from sdgraph.passes import registry

    p = Path(path) if path is not None else DEFAULT_SPACE
    data = read_yaml_object(p, "space file")
    where = str(p) if path is not None else "the default space"
    unknown = set(data) - {"stages", "targets", "optional_passes", "submodels"}
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (stages, targets, optional_passes, submodels)")
    optional = set(data.get("optional_passes") or [])
    registered = set(registry())
    notes: list[str] = []
    raw_stages = data.get("stages")
    if not isinstance(raw_stages, dict) or not raw_stages:
        raise UsageError(f"{where}: 'stages' must map stage names to lists of choices")
    stages = [(str(s), _stage(str(s), c, optional, registered, notes, where)) for s, c in raw_stages.items()]
    stages = [(s, cs) for s, cs in stages if cs]
    subs = data.get("submodels", "all")
    if subs in (None, "all"):
        submodels = None
    elif isinstance(subs, list) and subs and all(isinstance(s, str) for s in subs):
        submodels = list(subs)
    else:
        raise UsageError(f"{where}: 'submodels' is 'all' or a list of submodel names")
    space = Space(stages, _targets(data.get("targets"), targets, notes, where), submodels, notes, str(p))
    if not any(c.text or c.pass_name for _, cs in space.stages for c in cs):
        raise UsageError(f"{where}: the space has no pass at all")
    return space
