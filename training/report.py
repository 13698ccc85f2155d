"""Self-contained HTML evaluation reports with hand-written inline SVG charts.

No plotting library and no external assets, so a report is one file that opens offline. All text that
can come from data (feature values, metric names, config) goes through ``_e``; only SVG is inserted raw."""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["fmt", "svg_line_chart", "svg_bar_chart", "svg_histogram", "evaluation_report", "results_page"]

Lim = tuple[float, float]
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
_ML, _MR, _MB = 58, 14, 44  # left room for y tick labels, bottom room for x ticks + label
_CHARTS = '<div class="charts">\n{}\n</div>'  # flex row that wraps: charts tile to the window width
_CSS = """body{font-family:system-ui,sans-serif;color:#222;max-width:1100px;margin:24px auto;padding:0 16px}
h1{font-size:22px;margin:0 0 8px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}.note{color:#777}
table{border-collapse:collapse;font-size:13px;margin:4px 0}th,td{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f3f3f3}th.sort::after{content:" \\21C5";color:#999}tr:nth-child(even) td{background:#fafafa}
td.num{text-align:right;font-variant-numeric:tabular-nums}.charts{display:flex;flex-wrap:wrap;gap:12px}"""


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def fmt(v: Any) -> str:
    """Display format shared by tables and legends; 4 decimals keeps small AUC deltas visible; None is "-"."""
    if v is None:
        return "-"
    if not _num(v) or not math.isfinite(f := float(v)):
        return str(v)
    if f.is_integer() and abs(f) < 1e15:  # counts arrive as floats (rows=4000.0)
        return f"{int(f):,}"
    return f"{f:.4f}" if 1e-3 <= abs(f) < 1e6 else f"{f:.4g}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """At most ~n+1 'nice' (1/2/2.5/5 x 10^k) tick positions inside [lo, hi]."""
    raw = (hi - lo) / n
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _span(vals: Sequence[float], given: Lim | None) -> Lim:
    finite = [v for v in vals if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if given is not None and all(math.isfinite(g) for g in given):  # caller's limits win when usable
        lo, hi = float(given[0]), float(given[1])
    if not hi > lo:  # flat or single-point data still needs a non-zero span to map onto
        pad = abs(lo) * 0.05 or 0.5
        lo, hi = lo - pad, hi + pad
    return lo, hi


def _frame(title: str, xlabel: str, ylabel: str, width: int, height: int, xl: Lim, yl: Lim,
           legend: Sequence[str] = (), xticks: bool = True,
           ) -> tuple[list[str], Callable[[float], float], Callable[[float], float]]:
    """SVG open tag, title, legend, axes and ticks, plus data->pixel maps clamped to the plot area. The legend
    has its own band under the title so it never hides data; clamping keeps all coordinates in the viewBox."""
    items: list[tuple[float, int, str]] = []
    cx, row = float(_ML), 0
    for name in legend:
        label = name if len(name) <= 48 else name[:47] + "\u2026"
        if cx + 30 + 6.5 * len(label) > width - _MR and cx > _ML:  # wrap to a new legend row
            cx, row = float(_ML), row + 1
        items.append((cx, row, label))
        cx += 30 + 6.5 * len(label)
    x0, x1, yb, yt = _ML, width - _MR, height - _MB, 30 + (14 * (row + 1) if items else 0)

    def sx(v: float) -> float:
        return x0 + (min(max(v, xl[0]), xl[1]) - xl[0]) / (xl[1] - xl[0]) * (x1 - x0)

    def sy(v: float) -> float:  # SVG y grows downward
        return yb - (min(max(v, yl[0]), yl[1]) - yl[0]) / (yl[1] - yl[0]) * (yb - yt)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
           f'height="{height}" font-family="sans-serif" font-size="11" role="img"><title>{_e(title)}</title>'
           f'<text x="{width / 2:.1f}" y="18" text-anchor="middle" font-size="13" font-weight="bold">'
           f"{_e(title)}</text>"]
    out += [f'<rect x="{lx:.1f}" y="{22 + 14 * r}" width="18" height="4" fill="{_COLORS[i % 8]}"/>'
            f'<text x="{lx + 22:.1f}" y="{30 + 14 * r}">{_e(label)}</text>' for i, (lx, r, label) in enumerate(items)]
    out += [f'<line x1="{x0}" y1="{sy(t):.1f}" x2="{x1}" y2="{sy(t):.1f}" stroke="#eee"/>'
            f'<text x="{x0 - 4}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:g}</text>' for t in _ticks(*yl)]
    out += [f'<line x1="{sx(t):.1f}" y1="{yb}" x2="{sx(t):.1f}" y2="{yb + 4}" stroke="#666"/>'
            f'<text x="{sx(t):.1f}" y="{yb + 16}" text-anchor="middle">{t:g}</text>'
            for t in (_ticks(*xl) if xticks else [])]
    out.append(f'<rect x="{x0}" y="{yt}" width="{x1 - x0}" height="{yb - yt}" fill="none" stroke="#999"/>'
               f'<text x="{(x0 + x1) / 2:.1f}" y="{height - 8}" text-anchor="middle">{_e(xlabel)}</text>'
               f'<text transform="translate(14 {(yt + yb) / 2:.1f}) rotate(-90)" '
               f'text-anchor="middle">{_e(ylabel)}</text>')
    return out, sx, sy


def svg_line_chart(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, title: str, xlabel: str,
                   ylabel: str, width: int = 480, height: int = 320, diagonal: bool = False,
                   xlim: Lim | None = None, ylim: Lim | None = None, markers: bool | None = None,
                   lines: bool = True) -> str:
    """One polyline per series (`lines=False`: a scatter of its points); non-finite points are dropped.
    markers=None: dots if <= 30 points."""
    clean = {str(k): [(float(x), float(y)) for x, y in zip(xs, ys)
                      if math.isfinite(float(x)) and math.isfinite(float(y))]
             for k, (xs, ys) in series.items()}
    xl = _span([x for pts in clean.values() for x, _ in pts], xlim)
    yl = _span([y for pts in clean.values() for _, y in pts], ylim)
    out, sx, sy = _frame(title, xlabel, ylabel, width, height, xl, yl, list(clean))
    lo, hi = max(xl[0], yl[0]), min(xl[1], yl[1])
    if diagonal and hi > lo:
        out.append(f'<line x1="{sx(lo):.1f}" y1="{sy(lo):.1f}" x2="{sx(hi):.1f}" y2="{sy(hi):.1f}" '
                   'stroke="#888" stroke-dasharray="4 3"/>')
    for i, (name, pts) in enumerate(clean.items()):
        color = _COLORS[i % 8]
        if pts and lines:
            xy = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            out.append(f'<polyline points="{xy}" fill="none" stroke="{color}" stroke-width="1.8">'
                       f"<title>{_e(name)}</title></polyline>")
        if markers or not lines or (markers is None and len(pts) <= 30):
            r = 2.5 if lines else 4
            out.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{r}" fill="{color}"/>' for x, y in pts)
    return "\n".join(out + ["</svg>"])


def svg_bar_chart(labels: Sequence[str], values: Sequence[float | None], *, title: str, ylabel: str,
                  width: int = 480, height: int = 320, ylim: Lim | None = None, ref: float | None = None,
                  ref_label: str = "overall") -> str:
    """Vertical bars from the axis bottom; missing/nan values show 'n/a'. ref: dashed level line."""
    vals = [float(v) if _num(v) else math.nan for v in values]
    yl = _span([v for v in vals if math.isfinite(v)] + [0.0] + ([ref] if ref is not None else []), ylim)
    out, _, sy = _frame(title, "", ylabel, width, height, (0.0, 1.0), yl, xticks=False)
    slot = (width - _MR - _ML) / max(len(vals), 1)
    chars, base = max(3, int(slot / 6.2)), sy(yl[0])  # labels are cut to their slot; <title> has the full text
    for i, (label, v) in enumerate(zip(labels, vals)):
        cx, text, ok = _ML + slot * (i + 0.5), str(label), math.isfinite(v)
        short = text if len(text) <= chars else text[:chars - 1] + "\u2026"
        top = sy(v) if ok else base  # sy(nan) would be nan
        out.append(f'<text x="{cx:.1f}" y="{height - _MB + 14}" text-anchor="middle">'
                   f"<title>{_e(text)}</title>{_e(short)}</text>")
        if ok:
            out.append(f'<rect x="{cx - slot * 0.35:.1f}" y="{top:.1f}" width="{slot * 0.7:.1f}" height='
                       f'"{base - top:.1f}" fill="{_COLORS[0]}"><title>{_e(text)}: {fmt(v)}</title></rect>')
        if slot >= 28 or not ok:  # value labels only where they fit; 'n/a' always
            out.append(f'<text x="{cx:.1f}" y="{max(top - 3, 12):.1f}" text-anchor="middle" font-size="9">'
                       f'{fmt(v) if ok else "n/a"}</text>')
    if ref is not None and math.isfinite(ref):
        out.append(f'<line x1="{_ML}" y1="{sy(ref):.1f}" x2="{width - _MR}" y2="{sy(ref):.1f}" stroke="{_COLORS[1]}"'
                   f' stroke-dasharray="5 3"/><text x="{width - _MR - 2}" y="{sy(ref) - 3:.1f}" '
                   f'text-anchor="end" fill="{_COLORS[1]}">{_e(ref_label)} {fmt(ref)}</text>')
    return "\n".join(out + ["</svg>"])


def svg_histogram(series: Mapping[str, Any], bins: int = 30, range: Lim = (0.0, 1.0), *,  # noqa: A002
                  title: str, density: bool = True, xlabel: str = "score", width: int = 480, height: int = 320,
                  weights: Mapping[str, Any] | None = None) -> str:
    """Overlaid step outlines (not filled bars) so several distributions stay readable together. `weights`:
    rows per value (pre-binned data), by series name."""
    steps: dict[str, tuple[list[float], list[float]]] = {}
    for name, arr in series.items():
        a = np.asarray(arr, dtype=np.float64).ravel()
        w = np.ones_like(a) if weights is None else np.asarray(weights[name], dtype=np.float64).ravel()
        ok = np.isfinite(a) & (a >= range[0]) & (a <= range[1]) & (w > 0)
        a, w = a[ok], w[ok]
        if a.size:  # skip empty samples: their density is 0/0
            h, edges = np.histogram(a, bins=bins, range=range, weights=w, density=density)
            steps[f"{name} (n={w.sum():,.0f})"] = (np.repeat(edges, 2).tolist(), [0.0, *np.repeat(h, 2).tolist(), 0.0])
    top = max((max(ys) for _, ys in steps.values()), default=1.0) * 1.05 or 1.0
    return svg_line_chart(steps, title=title, xlabel=xlabel, ylabel="density" if density else "count",
                          width=width, height=height, xlim=range, ylim=(0.0, top), markers=False)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dicts become dotted keys so they fit a two-column table."""
    return {key: val for k, v in d.items()
            for key, val in (_flatten(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v}).items()}


def _table(rows: Sequence[Mapping[str, Any]], sortable: bool = False) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))  # union, first-seen order
    th, num = ('<th class="sort">' if sortable else "<th>"), '<td class="num">'
    head = "".join(f"{th}{_e(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"{num if _num(r.get(c)) else '<td>'}{_e(fmt(r[c])) if c in r else ''}</td>"
                                    for c in cols) + "</tr>\n" for r in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def _page(title: str, meta: Mapping[str, Any] | None, parts: Sequence[str]) -> str:
    """The whole document; meta (model, version, config...) becomes a key/value table under the h1."""
    flat = [{"key": k, "value": v} for k, v in _flatten(meta or {}).items()]
    return ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{_e(title)}</title>\n<style>\n{_CSS}\n</style>\n</head>\n<body>\n<h1>{_e(title)}</h1>\n"
            + "\n".join(([_table(flat)] if flat else []) + list(parts)) + "\n</body>\n</html>\n")


def _history_charts(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """One chart per metric; train_/valid_ variants of the same metric share it (same scale)."""
    groups: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for k in dict.fromkeys(k for h in history for k, v in h.items() if k != "epoch" and _num(v)):
        pts = [(float(h["epoch"] if _num(h.get("epoch")) else i), float(h[k]))
               for i, h in enumerate(history) if _num(h.get(k))]
        base = re.sub(r"^(train|training|valid|validation|val|test|eval)[_/.]", "", k)
        groups.setdefault(base, {})[k] = ([x for x, _ in pts], [y for _, y in pts])
    return [svg_line_chart(s, title=f"{b} by epoch", xlabel="epoch", ylabel=b) for b, s in groups.items()]


def evaluation_report(*, title: str, metrics: Mapping[str, Any], curves: Mapping[str, Any],
                      slices: Mapping[str, list[dict[str, Any]]] | None = None,
                      history: list[dict[str, Any]] | None = None, meta: Mapping[str, Any] | None = None) -> str:
    """Full HTML page: meta, scalar metrics, ROC, calibration, score histogram, slices, curves. `curves` is
    `training.evalagg.Aggregate.curves()`: ROC points, calibration bins, scores by label as weighted values."""
    auc = float(metrics["auc"]) if _num(metrics.get("auc")) else math.nan
    scalars = [{"metric": k, "value": v} for k, v in metrics.items() if _num(v) or isinstance(v, str)]
    fpr, tpr = curves["roc"]
    charts = [svg_line_chart({f"model (AUC={auc:.4f})": (fpr, tpr)}, title="ROC curve",
                             xlabel="false positive rate", ylabel="true positive rate",
                             diagonal=True, xlim=(0.0, 1.0), ylim=(0.0, 1.0), markers=False)
              if fpr else '<p class="note">ROC curve undefined: y has a single class.</p>']
    cal = curves["calibration"]
    pts = [(a, b) for a, b in zip(cal["bin_mean_prediction"], cal["bin_label_rate"]) if a is not None]
    # CTR scores crowd near 0; zoom both axes to the occupied range so the bins are visible.
    lim = (0.0, min(1.0, max([0.05] + [max(a, b) for a, b in pts]) * 1.1))
    charts.append(svg_line_chart({"model": ([a for a, _ in pts], [b for _, b in pts])},
                                 title=f"Calibration (ECE={cal['ece']:.4f})", xlabel="mean prediction in bin",
                                 ylabel="label rate in bin", diagonal=True, xlim=lim, ylim=lim, markers=True))
    scores = curves["scores"]
    top = max((float(v[w > 0].max(initial=0.0)) for v, w in scores.values()), default=0.0)
    hi = min(1.0, math.ceil(top * 20 + 1e-9) / 20) or 1.0
    charts.append(svg_histogram({k: v for k, (v, _) in scores.items()}, bins=40, range=(0.0, hi),
                                weights={k: w for k, (_, w) in scores.items()}, title="Score distribution by label"))
    parts = ["<h2>Metrics</h2>", _table(scalars), "<h2>Model quality</h2>", _CHARTS.format("\n".join(charts))]
    parts += ["<h2>Slices</h2>"] if slices else []
    for feature, rows in (slices or {}).items():
        aucs = [r.get("auc") for r in rows]
        # Bars start at AUC 0.5 (random), or lower if a slice is worse, so differences stay visible.
        low = min([0.5] + [float(a) for a in aucs if _num(a) and math.isfinite(float(a))])
        chart = svg_bar_chart([str(r.get("value")) for r in rows], aucs, title=f"AUC by {feature}",
                              ylabel="AUC", ylim=(math.floor(low * 20) / 20, 1.0), ref=auc)
        parts += [f"<h3>{_e(feature)}</h3>", _CHARTS.format(chart), _table(rows)]
    if history:
        parts += ["<h2>Training curves</h2>", _CHARTS.format("\n".join(_history_charts(history)))]
    return _page(title, meta, parts)


def results_page(*, title: str, table: list[dict[str, Any]], charts: list[str],
                 meta: Mapping[str, Any] | None = None) -> str:
    """Generic page (e.g. hyperparameter search): one results table plus caller-built SVG charts."""
    parts = [f"<h2>Results ({len(table)} rows)</h2>", _table(table, sortable=True)]
    return _page(title, meta, parts + (["<h2>Charts</h2>", _CHARTS.format("\n".join(charts))] if charts else []))
