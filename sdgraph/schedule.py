"""Per-step UNet schedules: which UNet variant of a model directory runs at which denoising step.

A model directory may hold UNet variants beside ``unet/`` (``unet_shallow/`` from ``deepcache``, or
any graph a pass made), named in the manifest under ``"variants"``, and a schedule under
``"schedule"``::

    "variants": {"unet_shallow": {"of": "unet", "pass": "deepcache{interval=3}",
                                  "feature": {"input": "deepcache_feature", "from": "unet",
                                              "channels": 32, "downscale": 2}}},
    "schedule": {"unet": {"cache": {"interval": 3, "spacing": "uniform"},
                          "rules": [{"steps": "cache", "variant": "unet"},
                                    {"steps": "all", "variant": "unet_shallow"}]}}

``rules`` are tried in order at each step index ``i`` (0-based, over the steps actually run); the
first that matches names the variant; no match runs the submodel itself (``unet``). ``steps`` is:

- ``"all"`` (or absent): every step;
- ``"cache"``: the cache steps of ``cache`` (``interval`` N, ``spacing`` ``uniform``: every N-th
  step from 0; ``quadratic``: DeepCache's non-uniform spacing, as many cache steps as uniform,
  denser around ``center``, a fraction of the steps, 0.3 by default);
- ``[a, b]``: step indices ``a <= i < b`` (``b`` null: to the end);
- ``{"fraction": [x, y]}``: ``x*T <= i < y*T`` for ``T`` steps (``tome`` for the first 60 %:
  ``{"steps": {"fraction": [0, 0.6]}, "variant": "unet_tome"}``).

A variant with a ``feature`` reads a tensor that variant ``from`` computed at an earlier step
(DeepCache's cached deep feature): a plan that calls it before any such step is refused.
Everything here is plain data and integers: every target's runner follows the same plan.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from sdgraph.errors import InputError

__all__ = ["SPACINGS", "Rule", "Schedule", "cache_steps", "quadratic_steps", "deepcache_schedule", "feature_shape",
           "variants_of", "read_schedule"]

SPACINGS = ("uniform", "quadratic")
_QUAD_POWER = 1.4  # DeepCache's starting exponent for the non-uniform spacing
_QUAD_CENTER = 0.3  # DeepCache's SD1.5 setting: center 15 of 50 steps


def quadratic_steps(total: int, count: int, center: int | None = None, power: float = _QUAD_POWER) -> list[int]:
    """``count`` step indices in ``[0, total)``, 0 first, dense around ``center`` and sparser away from it.

    Evenly spaced points ``u`` between ``-center**(1/p)`` and ``(total-center)**(1/p)`` are mapped to
    ``center + sign(u)*|u|**p`` (DeepCache's spacing); the exponent ``p`` drops by 0.02 from 1.4
    until the distinct integers number ``count``; evenly spaced steps when no exponent > 1 gives them.
    """
    if count >= total:
        return list(range(total))
    c = int(round(total * _QUAD_CENTER)) if center is None else int(center)
    c = min(max(c, 0), total - 1)
    p = power
    while p > 1.0:
        lo, hi = -(c ** (1.0 / p)), (total - c) ** (1.0 / p)
        pts = [lo + (hi - lo) * k / count for k in range(count + 1)]
        ints = sorted({int(math.floor(c + math.copysign(abs(u) ** p, u) + 1e-9)) for u in pts[1:-1]})
        steps = sorted({0, *[i for i in ints if 0 < i < total]})
        if len(steps) == count:
            return steps
        p = round(p - 0.02, 10)
    return sorted({int(k * total / count) for k in range(count)})


def cache_steps(total: int, interval: int, spacing: str = "uniform", center: int | None = None) -> frozenset[int]:
    """The steps that run the full graph and refresh the cache, over ``total`` steps."""
    if spacing not in SPACINGS:
        raise InputError(f"schedule: cache spacing {spacing!r} is not one of {', '.join(SPACINGS)}")
    if interval <= 1:
        return frozenset(range(total))
    if spacing == "uniform":
        return frozenset(range(0, total, interval))
    return frozenset(quadratic_steps(total, math.ceil(total / interval), center))


@dataclasses.dataclass(frozen=True)
class Rule:
    variant: str
    steps: Any = "all"  # "all" | "cache" | (a, b|None) | ("fraction", x, y)

    def matches(self, i: int, total: int, cached: frozenset[int]) -> bool:
        s = self.steps
        if s == "all":
            return True
        if s == "cache":
            return i in cached
        if s[0] == "fraction":
            return s[1] * total <= i < s[2] * total
        return s[0] <= i and (s[1] is None or i < s[1])

    def to_json(self) -> dict[str, Any]:
        s = self.steps
        if isinstance(s, str):
            steps: Any = s
        elif s[0] == "fraction":
            steps = {"fraction": [s[1], s[2]]}
        else:
            steps = [s[0], s[1]]
        return {"steps": steps, "variant": self.variant}


def _bad(where: str, why: str) -> InputError:
    return InputError(f"schedule {where}: {why}")


def _parse_steps(raw: Any, where: str, has_cache: bool) -> Any:
    if raw is None or raw == "all":
        return "all"
    if raw == "cache":
        if not has_cache:
            raise _bad(where, 'steps "cache" needs a "cache" entry ({"interval": N, "spacing": "uniform"})')
        return "cache"
    if isinstance(raw, Mapping) and set(raw) == {"fraction"}:
        fr = raw["fraction"]
        if (not isinstance(fr, (list, tuple)) or len(fr) != 2 or not all(isinstance(x, (int, float))
                                                                          and not isinstance(x, bool) for x in fr)
                or not 0 <= fr[0] < fr[1] <= 1):
            raise _bad(where, f"fraction {fr!r} must be [x, y] with 0 <= x < y <= 1")
        return ("fraction", float(fr[0]), float(fr[1]))
    if isinstance(raw, (list, tuple)) and len(raw) == 2:
        a, b = raw
        ok_a = isinstance(a, int) and not isinstance(a, bool) and a >= 0
        ok_b = b is None or (isinstance(b, int) and not isinstance(b, bool) and b > (a if ok_a else 0))
        if ok_a and ok_b:
            return (a, b)
        raise _bad(where, f"step range {list(raw)!r} must be [a, b] with 0 <= a < b (b null: to the end)")
    raise _bad(where, f'steps {raw!r} must be "all", "cache", [a, b] or {{"fraction": [x, y]}}')


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Rules over step indices for one submodel (``base``, e.g. ``unet``) and its variants."""

    base: str
    rules: tuple[Rule, ...]
    interval: int = 0  # 0: no cache steps
    spacing: str = "uniform"
    center: int | None = None
    features: Mapping[str, str] = dataclasses.field(default_factory=dict)  # variant -> the variant computing its feature

    @classmethod
    def parse(cls, base: str, raw: Any, variants: Mapping[str, Mapping[str, Any]] | None = None) -> "Schedule":
        """Validate a manifest entry (bad data: InputError, one line). ``variants``: the manifest's, to check names."""
        where = f"of {base!r}"
        if not isinstance(raw, Mapping):
            raise _bad(where, f"must be an object with \"rules\", not {type(raw).__name__}")
        unknown = set(raw) - {"rules", "cache"}
        if unknown:
            raise _bad(where, f"unknown key(s) {', '.join(sorted(unknown))} (keys: rules, cache)")
        interval, spacing, center = 0, "uniform", None
        cache = raw.get("cache")
        if cache is not None:
            if not isinstance(cache, Mapping) or set(cache) - {"interval", "spacing", "center"}:
                raise _bad(where, 'cache must be {"interval": N, "spacing": "uniform"|"quadratic"[, "center": i]}')
            interval, spacing, center = cache.get("interval"), cache.get("spacing", "uniform"), cache.get("center")
            if not isinstance(interval, int) or isinstance(interval, bool) or not 1 <= interval <= 1000:
                raise _bad(where, f"cache interval {interval!r} must be an integer in 1..1000")
            if spacing not in SPACINGS:
                raise _bad(where, f"cache spacing {spacing!r} must be one of {', '.join(SPACINGS)}")
            if center is not None and (not isinstance(center, int) or isinstance(center, bool) or center < 0):
                raise _bad(where, f"cache center {center!r} must be a step index >= 0")
        rules_raw = raw.get("rules")
        if not isinstance(rules_raw, list) or not rules_raw:
            raise _bad(where, "rules must be a non-empty list of {\"steps\": ..., \"variant\": NAME}")
        known = {base} | {k for k, v in (variants or {}).items() if isinstance(v, Mapping) and v.get("of") == base}
        rules = []
        for k, r in enumerate(rules_raw):
            w = f"{where}, rule {k}"
            if not isinstance(r, Mapping) or set(r) - {"steps", "variant"} or "variant" not in r:
                raise _bad(w, 'must be {"steps": ..., "variant": NAME}')
            if variants is not None and r["variant"] not in known:
                raise _bad(w, f"variant {r['variant']!r} is not {base!r} or one of its variants ({', '.join(sorted(known))})")
            rules.append(Rule(str(r["variant"]), _parse_steps(r.get("steps"), w, cache is not None)))
        features = {}
        for name, v in (variants or {}).items():
            feat = v.get("feature") if isinstance(v, Mapping) else None
            if name in known and isinstance(feat, Mapping):
                features[name] = str(feat.get("from", base))
        return cls(base, tuple(rules), interval, spacing, center, features)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.interval:
            out["cache"] = {"interval": self.interval, "spacing": self.spacing}
            if self.center is not None:
                out["cache"]["center"] = self.center
        out["rules"] = [r.to_json() for r in self.rules]
        return out

    def cache_steps(self, total: int) -> frozenset[int]:
        return cache_steps(total, self.interval, self.spacing, self.center) if self.interval else frozenset()

    def which(self, step: int, total: int) -> str:
        """The variant to call at ``step`` of ``total``."""
        cached = self.cache_steps(total)
        return next((r.variant for r in self.rules if r.matches(step, total, cached)), self.base)

    def plan(self, total: int) -> list[str]:
        """The variant of every step; refused when a variant reads a feature no earlier step computed."""
        cached = self.cache_steps(total)
        out = [next((r.variant for r in self.rules if r.matches(i, total, cached)), self.base) for i in range(total)]
        for i, v in enumerate(out):
            src = self.features.get(v)
            if src is not None and src not in out[:i]:
                raise InputError(f"schedule of {self.base!r}: step {i} of {total} calls {v!r}, which reads the feature "
                                 f"{src!r} computes, before any step called {src!r}")
        return out


def deepcache_schedule(base: str, shallow: str, interval: int, spacing: str) -> Schedule:
    """DeepCache's alternation: ``base`` (the full graph, refreshing the feature) at cache steps, ``shallow`` between."""
    return Schedule(base, (Rule(base, "cache"), Rule(shallow, "all")), interval, spacing,
                    features={shallow: base})


def variants_of(manifest: Mapping[str, Any], base: str) -> dict[str, dict[str, Any]]:
    """The manifest's variants of submodel ``base``: name -> entry (``of``, ``pass``, ``feature``...)."""
    raw = manifest.get("variants")
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise InputError(f'manifest "variants" must be an object, not {type(raw).__name__}')
    out = {}
    for name, entry in raw.items():
        if not isinstance(entry, Mapping) or not isinstance(entry.get("of"), str):
            raise InputError(f'manifest variant {name!r} must be an object with "of": SUBMODEL')
        if entry["of"] == base:
            out[str(name)] = dict(entry)
    return out


def read_schedule(manifest: Mapping[str, Any], base: str = "unet") -> Schedule | None:
    """The schedule of ``base`` in a manifest, validated against its variants; None when it has none."""
    raw = manifest.get("schedule")
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise InputError(f'manifest "schedule" must be an object (submodel -> schedule), not {type(raw).__name__}')
    if base not in raw:
        return None
    return Schedule.parse(base, raw[base], variants_of(manifest, base))


def feature_shape(sample: tuple[int, ...] | list[int], feature: Mapping[str, Any]) -> tuple[int, ...]:
    """The cached feature's dims for a UNet ``sample`` of dims [B, C, H, W]: [B, channels, H/downscale, W/downscale]."""
    f = int(feature.get("downscale", 1))
    return (int(sample[0]), int(feature["channels"]), -(-int(sample[2]) // f), -(-int(sample[3]) // f))
