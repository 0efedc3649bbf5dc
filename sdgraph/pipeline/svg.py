"""Small inline-SVG charts for the HTML report: horizontal bars and a scatter with a highlighted front.

No plotting library: the report must be one self-contained file, and these two chart kinds are all it
draws. Every mark carries a ``<title>`` (the browser shows it on hover) and a ``data-value`` attribute
(tests read the numbers back from the page).
"""

from __future__ import annotations

import math
from html import escape
from typing import Sequence

__all__ = ["bar_chart", "scatter_chart", "PALETTE"]

PALETTE = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6", "#9d755d")


def _fmt(v: float) -> str:
    if v == 0 or not math.isfinite(v):
        return str(v)
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def bar_chart(labels: Sequence[str], values: Sequence[float], *, title: str, unit: str = "",
              width: int = 640, bar_h: int = 22, ref: float | None = None) -> str:
    """Horizontal bars, one per label; ``ref`` draws a dashed line at that value (e.g. the baseline)."""
    if len(labels) != len(values):
        raise ValueError("labels and values differ in length")
    label_w = min(260, 12 + 7 * max((len(s) for s in labels), default=4))
    plot_w = width - label_w - 70
    h = 34 + bar_h * len(values) + 8
    finite = [v for v in values if math.isfinite(v)]
    vmax = max(finite + ([ref] if ref else []), default=1.0) or 1.0
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart bar" width="{width}" height="{h}" '
           f'viewBox="0 0 {width} {h}" role="img" aria-label="{escape(title)}">',
           f'<text x="4" y="16" class="chart-title">{escape(title)}</text>']
    for i, (lab, v) in enumerate(zip(labels, values)):
        y = 28 + i * bar_h
        w = 0 if not math.isfinite(v) else max(1.0, plot_w * v / vmax)
        out.append(f'<text x="{label_w - 6}" y="{y + bar_h * 0.65:.1f}" text-anchor="end" class="chart-label">'
                   f'{escape(lab)}</text>')
        out.append(f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{bar_h - 6}" '
                   f'fill="{PALETTE[i % len(PALETTE)]}" data-label="{escape(lab)}" data-value="{v!r}">'
                   f'<title>{escape(lab)}: {_fmt(v)} {escape(unit)}</title></rect>')
        out.append(f'<text x="{label_w + w + 4:.1f}" y="{y + bar_h * 0.65:.1f}" class="chart-value">'
                   f'{_fmt(v)} {escape(unit)}</text>')
    if ref:
        x = label_w + plot_w * ref / vmax
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="24" y2="{h - 4}" class="chart-ref"/>')
    out.append("</svg>")
    return "".join(out)


def scatter_chart(points: Sequence[dict], *, x: str, y: str, title: str, x_label: str, y_label: str,
                  width: int = 640, height: int = 360) -> str:
    """Points ``{x: .., y: .., "label": .., "front": bool}``; the front is drawn joined and highlighted."""
    pts = [p for p in points if isinstance(p.get(x), (int, float)) and isinstance(p.get(y), (int, float))
           and math.isfinite(p[x]) and math.isfinite(p[y])]
    left, right, top, bottom = 60, 16, 28, 44
    pw, ph = width - left - right, height - top - bottom
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart scatter" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
           f'<text x="4" y="16" class="chart-title">{escape(title)}</text>']
    if not pts:
        out.append(f'<text x="{left}" y="{top + 20}" class="chart-label">no finite points</text></svg>')
        return "".join(out)
    xs, ys = [p[x] for p in pts], [p[y] for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x0, x1 = (x0 - 1, x1 + 1) if x0 == x1 else (x0 - 0.05 * (x1 - x0), x1 + 0.05 * (x1 - x0))
    y0, y1 = (y0 - 1, y1 + 1) if y0 == y1 else (y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0))

    def px(v: float) -> float:
        return left + pw * (v - x0) / (x1 - x0)

    def py(v: float) -> float:
        return top + ph - ph * (v - y0) / (y1 - y0)

    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="chart-frame"/>')
    for k in range(5):
        vx, vy = x0 + (x1 - x0) * k / 4, y0 + (y1 - y0) * k / 4
        out.append(f'<text x="{px(vx):.1f}" y="{top + ph + 14}" text-anchor="middle" class="chart-tick">{_fmt(vx)}</text>')
        out.append(f'<text x="{left - 4}" y="{py(vy) + 4:.1f}" text-anchor="end" class="chart-tick">{_fmt(vy)}</text>')
    out.append(f'<text x="{left + pw / 2:.1f}" y="{height - 6}" text-anchor="middle" class="chart-label">'
               f'{escape(x_label)}</text>')
    out.append(f'<text x="12" y="{top + ph / 2:.1f}" transform="rotate(-90 12 {top + ph / 2:.1f})" '
               f'text-anchor="middle" class="chart-label">{escape(y_label)}</text>')
    front = sorted((p for p in pts if p.get("front")), key=lambda p: p[x])
    if len(front) > 1:
        path = " ".join(f"{px(p[x]):.1f},{py(p[y]):.1f}" for p in front)
        out.append(f'<polyline points="{path}" class="chart-front"/>')
    for p in pts:
        cls = "pt front" if p.get("front") else "pt"
        lab = str(p.get("label", ""))
        out.append(f'<circle cx="{px(p[x]):.1f}" cy="{py(p[y]):.1f}" r="{6 if p.get("front") else 4}" class="{cls}" '
                   f'data-x="{p[x]!r}" data-y="{p[y]!r}"><title>{escape(lab)}: {x_label} {_fmt(p[x])}, '
                   f'{y_label} {_fmt(p[y])}</title></circle>')
    out.append("</svg>")
    return "".join(out)
