"""``sdgraph report``: one self-contained HTML page from what the other commands wrote.

Inputs, each a file or a folder, recognised by content:

- a ``sdgraph demo`` folder (``demo.json``): its verify comparisons with their images, the pass
  reports of the optimized model dirs, the bench;
- a ``sdgraph verify -o`` folder (``verify.json`` + ``ref_*.png`` / ``cand_*.png``) or its JSON;
- ``sdgraph bench --json-out`` output (``bench.json``, the same as ``--json`` prints);
- ``sdgraph optimize --report`` JSON (per-submodel pass records with op counts and near misses);
- a model dir or artifact dir (``sdgraph.json``): the pass history its manifest records;
- a tune study (``tune.json``: ``{"trials": [{"number", "config", "s_per_image", "psnr", "ssim",
  "front", "error"}], "chosen": N}``).

:func:`collect` turns them into one plain dict (the data the page shows, also what ``--json``
prints); :func:`render` fills the Jinja2 template ``sdgraph/data/report.html.j2``. Images are inlined
as PNG data URIs, charts as inline SVG, the CSS and the few lines of script inline: the page opens
from disk with no network.
"""

from __future__ import annotations

import base64
import datetime as _dt
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from sdgraph.errors import InputError
from sdgraph.pipeline import svg

__all__ = ["collect", "render", "write_report", "heatmap", "REPORT_SCHEMA"]

# The top-level keys of collect()'s dict (the ``--json`` schema; the docs list each one's fields).
REPORT_SCHEMA = ("title", "created", "sdgraph_version", "inputs", "comparisons", "passes", "benches", "tunes",
                 "problems")

# Colour ramp of the difference heatmap: black (equal) -> purple -> orange -> yellow (largest).
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not readable JSON ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None


def _open_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, Image.DecompressionBombError, ValueError) as exc:
        raise InputError(f"{path}: not a readable image ({type(exc).__name__})") from None


def _png_uri(arr: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def heatmap(ref: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-pixel largest channel difference, coloured; returns (RGB image, the difference shown as white).

    The ramp is stretched to the largest difference present (at least 1), so small differences are
    visible; the second value says what the top of the ramp means in 0..255 pixel levels.
    """
    if ref.shape != cand.shape:
        raise InputError(f"reference and candidate images differ in size: {ref.shape[:2]} vs {cand.shape[:2]}")
    diff = np.abs(ref.astype(np.int16) - cand.astype(np.int16)).max(axis=-1).astype(np.float64)
    top = max(1, int(diff.max()))
    t = diff / top * (len(_RAMP) - 1)
    lo = np.floor(t).astype(int).clip(0, len(_RAMP) - 2)
    frac = (t - lo)[..., None]
    rgb = _RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac
    return rgb.round().astype(np.uint8), top


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


# -- readers, one per input kind ---------------------------------------------------------------
def _comparison(label: str, rep: dict, image_dir: Path | None) -> dict[str, Any]:
    images = []
    for i, m in enumerate(rep.get("images") or []):
        entry = {"prompt": m.get("prompt", ""), "seed": m.get("seed"), "psnr": _finite(m.get("psnr")),
                 "ssim": _finite(m.get("ssim")), "max_pixel_diff": m.get("max_pixel_diff")}
        if image_dir is not None and (image_dir / f"ref_{i:03d}.png").is_file() \
                and (image_dir / f"cand_{i:03d}.png").is_file():
            ref = _open_rgb(image_dir / f"ref_{i:03d}.png")
            cand = _open_rgb(image_dir / f"cand_{i:03d}.png")
            heat, top = heatmap(ref, cand)
            entry.update(ref=_png_uri(ref), cand=_png_uri(cand), heat=_png_uri(heat), heat_top=top,
                         size=f"{ref.shape[1]}x{ref.shape[0]}")
        images.append(entry)
    subs = {}
    for name, s in (rep.get("submodels") or {}).items():
        subs[name] = {out: {k: m.get(k) for k in ("max_abs", "max_rel", "mean_abs", "cosine", "finite")}
                      for out, m in (s.get("outputs") or {}).items()}
    return {"label": label, "reference": rep.get("reference"), "candidate": rep.get("candidate"),
            "summary": rep.get("summary", {}), "submodels": subs, "images": images,
            "notes": list(rep.get("notes") or [])}


def _pass_history(label: str, manifest: dict) -> list[dict[str, Any]]:
    out = []
    for step in manifest.get("passes") or []:
        if not isinstance(step, dict):
            continue
        subs = {}
        for name, s in (step.get("submodels") or {}).items():
            subs[name] = {"records": [{"pass": r.get("pass"), "modified": r.get("modified"), "stats": r.get("stats") or {},
                                       "expected": r.get("expected"), "matched": r.get("matched"),
                                       "skipped": r.get("skipped"), "numbers": r.get("numbers")}
                                      for r in s.get("records") or []],
                          "nodes_before": s.get("nodes_before"), "nodes_after": s.get("nodes_after"),
                          "ops": [], "near_misses": []}
        out.append({"label": label, "pipeline": step.get("pipeline", ""), "submodels": subs})
    return out


def _optimize_report(label: str, data: dict) -> dict[str, Any]:
    subs = {}
    pipeline = ""
    for name, r in data.items():
        pipeline = r.get("pipeline", pipeline)
        before, after = r.get("ops_before") or {}, r.get("ops_after") or {}
        ops = [{"op": op, "before": before.get(op, 0), "after": after.get(op, 0)}
               for op in sorted(set(before) | set(after), key=lambda o: (-before.get(o, 0), o))]
        subs[name] = {"records": [{"pass": x.get("spec"), "modified": x.get("modified"), "stats": x.get("stats") or {},
                                   "expected": x.get("expected"), "matched": x.get("matched"),
                                   "skipped": x.get("skipped"), "numbers": x.get("numbers"),
                                   "nodes_before": x.get("nodes_before"), "nodes_after": x.get("nodes_after"),
                                   "seconds": x.get("seconds")}
                                  for x in r.get("records") or []],
                      "nodes_before": sum(before.values()), "nodes_after": sum(after.values()), "ops": ops,
                      "near_misses": [{"pass": x.get("spec"), "where": nm[0], "why": nm[1]}
                                      for x in r.get("records") or [] for nm in x.get("near_misses") or []
                                      if isinstance(nm, (list, tuple)) and len(nm) == 2]}
    return {"label": label, "pipeline": pipeline, "submodels": subs}


def _bench(label: str, data: dict, names: list[str] | None = None) -> dict[str, Any]:
    rows, failed = [], []
    for i, r in enumerate(data.get("results") or []):
        name = names[i] if names and i < len(names) else Path(str(r.get("path", f"dir {i}"))).name
        if "error" in r:
            failed.append({"label": name, "path": r.get("path"), "error": r["error"]})
            continue
        ratios = r.get("ratios") or {}
        rows.append({"label": name, "path": r.get("path"), "target": r.get("target"),
                     "e2e_s": _finite(r.get("e2e_s")), "speedup": _finite(ratios.get("e2e_speedup")),
                     "unet_its": _finite(r.get("unet_its")), "unet_call_ms": _finite(r.get("unet_call_ms")),
                     "peak_rss_mb": _finite(r.get("peak_rss_mb")),
                     "warmup_compile_s": _finite(r.get("warmup_compile_s")),
                     "warmup_cache_s": _finite(r.get("warmup_cache_s")), "submodel_ms": r.get("submodel_ms") or {}})
    charts = []
    if rows:
        charts.append(svg.bar_chart([r["label"] for r in rows], [r["e2e_s"] or math.nan for r in rows],
                                    title="seconds per image (lower is better)", unit="s"))
        charts.append(svg.bar_chart([r["label"] for r in rows], [r["speedup"] or math.nan for r in rows],
                                    title="speed-up over the first dir", unit="x", ref=1.0))
    meta = {k: data.get(k) for k in ("steps", "repeats", "prompt", "seed", "devices", "cpu_count")}
    return {"label": label, "meta": meta, "packages": data.get("packages") or {}, "rows": rows, "failed": failed,
            "charts": charts}


def _tune(label: str, data: dict) -> dict[str, Any]:
    trials = []
    for t in data.get("trials") or []:
        if not isinstance(t, dict):
            continue
        trials.append({"number": t.get("number"), "config": t.get("config"), "s_per_image": _finite(t.get("s_per_image")),
                       "psnr": _finite(t.get("psnr")), "ssim": _finite(t.get("ssim")), "front": bool(t.get("front")),
                       "error": t.get("error")})
    pts = [{"x": t["s_per_image"], "y": t["psnr"], "label": f"#{t['number']} {t['config']}", "front": t["front"]}
           for t in trials if t["error"] is None]
    chart = svg.scatter_chart(pts, x="x", y="y", title="trials: speed vs fidelity (front joined)",
                              x_label="s/image", y_label="PSNR dB")
    return {"label": label, "trials": trials, "chosen": data.get("chosen"), "chart": chart}


def _label(path: Path) -> str:
    return path.name or str(path)


def _collect_one(path: Path, data: dict[str, Any]) -> None:
    kind = None
    if path.is_dir():
        if (path / "demo.json").is_file():
            kind = "demo"
            demo = _read_json(path / "demo.json")
            if not isinstance(demo, dict):
                raise InputError(f"{path / 'demo.json'}: not a demo report (expected a JSON object)")
            for label, rep in (demo.get("verify") or {}).items():
                vdir = path / f"verify-{label}"
                data["comparisons"].append(_comparison(label, rep, vdir if vdir.is_dir() else None))
            for label in (demo.get("optimize") or {}):
                manifest = path / f"model-{label}" / "sdgraph.json"
                if manifest.is_file():
                    for step in _pass_history(f"model-{label}", _read_json(manifest)):
                        data["passes"].append(step)
            if demo.get("bench"):
                data["benches"].append(_bench(_label(path), demo["bench"], demo.get("bench_labels")))
            data["problems"].extend(f"skipped: {s}" for s in demo.get("skipped") or [])
            data["problems"].extend(f"failed: {s}" for s in demo.get("failed") or [])
        elif (path / "verify.json").is_file():
            kind = "verify"
            data["comparisons"].append(_comparison(_label(path), _read_json(path / "verify.json"), path))
        elif (path / "tune.json").is_file():
            kind = "tune"
            data["tunes"].append(_tune(_label(path), _read_json(path / "tune.json")))
        elif (path / "bench.json").is_file():
            kind = "bench"
            data["benches"].append(_bench(_label(path), _read_json(path / "bench.json")))
        elif (path / "sdgraph.json").is_file():
            kind = "model dir"
            manifest = _read_json(path / "sdgraph.json")
            if not isinstance(manifest, dict):
                raise InputError(f"{path / 'sdgraph.json'}: not a manifest (expected a JSON object)")
            hist = manifest.get("passes") or (manifest.get("source_manifest") or {}).get("passes") or []
            data["passes"].extend(_pass_history(_label(path), {"passes": hist}))
    elif path.is_file() and path.suffix == ".json":
        obj = _read_json(path)
        if isinstance(obj, dict) and isinstance(obj.get("results"), list):
            kind = "bench"
            data["benches"].append(_bench(_label(path), obj))
        elif isinstance(obj, dict) and isinstance(obj.get("trials"), list):
            kind = "tune"
            data["tunes"].append(_tune(_label(path), obj))
        elif isinstance(obj, dict) and "submodels" in obj and ("summary" in obj or "images" in obj):
            kind = "verify"
            data["comparisons"].append(_comparison(_label(path), obj, path.parent))
        elif isinstance(obj, dict) and obj and all(isinstance(v, dict) and "records" in v for v in obj.values()):
            kind = "optimize report"
            data["passes"].append(_optimize_report(_label(path), obj))
    elif not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if kind is None:
        raise InputError(f"{path}: nothing sdgraph report can read (expected a demo, verify, bench or tune folder, "
                         "a model/artifact dir, or one of their JSON files)")
    data["inputs"].append({"path": str(path), "kind": kind})


def collect(paths: Iterable[str | Path], title: str = "sdgraph report") -> dict[str, Any]:
    """Read every input into the report's data (see ``REPORT_SCHEMA``)."""
    from sdgraph import __version__

    data: dict[str, Any] = {"title": title, "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                            "sdgraph_version": __version__, "inputs": [], "comparisons": [], "passes": [],
                            "benches": [], "tunes": [], "problems": []}
    paths = [Path(p) for p in paths]
    if not paths:
        raise InputError("report: give at least one folder or JSON file")
    for p in paths:
        _collect_one(p, data)
    return data


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}"
    return str(v)


def _stats(d: dict) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in d.items() if not isinstance(v, (dict, list)))


def render(data: dict[str, Any]) -> str:
    """The HTML page for ``collect()``'s data."""
    import jinja2
    from importlib.resources import files
    from markupsafe import Markup

    template = (files("sdgraph") / "data" / "report.html.j2").read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _fmt
    env.filters["stats"] = _stats
    env.filters["svg"] = Markup  # charts are built by sdgraph.pipeline.svg, which escapes every text it writes
    env.filters["jsonattr"] = lambda v: json.dumps(v, default=str)
    return env.from_string(template).render(**data)


def write_report(paths: Iterable[str | Path], out: str | Path, *, title: str = "sdgraph report",
                 force: bool = False) -> tuple[Path, dict[str, Any]]:
    """Collect, render and write ``out`` atomically; returns (path, data)."""
    from sdgraph.ir.io import atomic_file
    from sdgraph.pipeline.runner import readable

    out = Path(out)
    if out.is_dir():
        raise InputError(f"{out}: is a folder; give a file name such as report.html")
    paths = [Path(p) for p in paths]
    for p in paths:
        if p.exists() and out.exists() and out.resolve() == p.resolve():
            raise InputError(f"{out}: the output is one of the inputs")
    if out.exists() and not force:
        raise InputError(f"{out}: exists (use --force to replace it)")
    data = collect(paths, title=title)
    html = render(data)
    with atomic_file(out, force=force) as tmp:
        tmp.write_text(html, encoding="utf-8")
    readable(out)
    return out, data
