"""training.report: self-contained HTML pages with hand-written SVG charts (fast, no Ray)."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import numpy as np
import pytest

from training import evalmetrics as em
from training import report
from training.evalagg import Aggregate, partial

XSS = "<script>alert(1)</script>"
SVG_NS = "http://www.w3.org/2000/svg"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
COORDS_X, COORDS_Y = {"x", "x1", "x2", "cx"}, {"y", "y1", "y2", "cy"}


class StrictPage(HTMLParser):
    """Fails on mismatched/unclosed tags; checks every SVG coordinate against its viewBox."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.box: tuple[float, float] | None = None
        self.svgs = self.polylines = self.doctypes = 0

    def handle_decl(self, decl: str) -> None:
        self.doctypes += decl.lower() == "doctype html"

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._check(tag, dict(attrs))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._check(tag, dict(attrs))

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
            return
        self.stack.pop()
        if tag == "svg":
            self.box = None

    def _in_box(self, what: str, x: float | None, y: float | None) -> None:
        assert self.box is not None
        w, h = self.box
        for v, hi in ((x, w), (y, h)):
            if v is not None and not (math.isfinite(v) and 0.0 <= v <= hi):
                self.errors.append(f"{what}: {v} outside 0..{hi}")

    def _check(self, tag: str, a: dict[str, str | None]) -> None:
        if tag == "svg":
            self.svgs += 1
            x0, y0, w, h = map(float, (a["viewbox"] or "").split())
            assert (x0, y0) == (0.0, 0.0)
            self.box = (w, h)
        elif self.box is not None:
            if tag == "polyline":
                self.polylines += 1
                for pair in (a["points"] or "").split():
                    x, y = (float(v) for v in pair.split(","))
                    self._in_box("polyline", x, y)
            for k, v in a.items():
                if k in COORDS_X | COORDS_Y and tag != "text" or k in ("width", "height"):
                    f = float(v or "nan")
                    self._in_box(f"{tag}.{k}", f if k not in COORDS_Y else None, f if k in COORDS_Y else None)


def _parse(page: str) -> StrictPage:
    parser = StrictPage()
    parser.feed(page)
    parser.close()
    assert parser.errors == [] and parser.stack == [], (parser.errors, parser.stack)
    return parser


def _data(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p_true = rng.beta(1.0, 6.0, n)
    y = (rng.random(n) < p_true).astype(np.int64)
    return y, np.clip(p_true + rng.normal(0.0, 0.05, n), 0.0, 1.0)


def _curves(y: np.ndarray, p: np.ndarray) -> dict:
    agg = Aggregate()
    agg.add(partial(y, p))
    return agg.curves()


@pytest.fixture(scope="module")
def evaluated() -> tuple[str, dict[str, float]]:
    y, p = _data()
    metrics = em.compute_metrics(y, p)
    slices = {"country": [
        {"value": XSS, "rows": 1200, "auc": 0.71, "label_rate": 0.14},
        {"value": "US & CA", "rows": 900, "auc": 0.66, "label_rate": 0.15},
        {"value": "a-very-long-slice-value-that-will-not-fit", "rows": 50, "auc": 0.42, "label_rate": 0.1},
        {"value": "tiny", "rows": 3, "auc": float("nan"), "label_rate": 0.0},
    ], "device": [{"value": "mobile", "rows": 3000, "auc": 0.7, "label_rate": 0.14}]}
    history = [{"epoch": e, "train_loss": 0.5 - 0.03 * e, "valid_loss": 0.52 - 0.02 * e,
                "valid_auc": 0.6 + 0.02 * e, "valid_logloss": 0.4, "lr": 1e-3, "note": "text"} for e in range(1, 6)]
    meta = {"model": "dcn<v2>", "version": 3, "trained_at": "2024-01-01T00:00:00Z",
            "config": {"lr": 0.001, "layers": [256, 128], "optim": {"name": "adam"}}}
    page = report.evaluation_report(title="Eval <run-1>", metrics=metrics, curves=_curves(y, p),
                                    slices=slices, history=history, meta=meta)
    return page, metrics


def test_evaluation_report_is_one_wellformed_document(evaluated: tuple[str, dict[str, float]]) -> None:
    page, _ = evaluated
    parsed = _parse(page)
    assert parsed.doctypes == 1 and page.count("<html") == 1 and page.rstrip().endswith("</html>")
    # ROC, calibration, histogram, 2 slice bars, 4 history charts (loss, auc, logloss, lr)
    assert parsed.svgs >= 4 and parsed.svgs == page.count("<svg") == 9
    assert parsed.polylines >= 6
    for svg in re.findall(r"<svg.*?</svg>", page, flags=re.S):  # each chart is also valid standalone XML
        assert ET.fromstring(svg).tag == f"{{{SVG_NS}}}svg"


def test_evaluation_report_is_self_contained(evaluated: tuple[str, dict[str, float]]) -> None:
    page, _ = evaluated
    assert set(re.findall(r"https?://[^\s\"'<>]*", page)) == {SVG_NS}
    assert "<script" not in page and "src=" not in page and "href=" not in page and "<link" not in page


def test_evaluation_report_content(evaluated: tuple[str, dict[str, float]]) -> None:
    page, metrics = evaluated
    auc = f"{metrics['auc']:.4f}"
    assert f"AUC={auc}" in page and f"<td class=\"num\">{auc}</td>" in page
    assert "ECE=" in page and "Score distribution by label" in page and "AUC by country" in page
    for title in ("loss by epoch", "auc by epoch", "logloss by epoch", "lr by epoch"):
        assert title in page
    assert "train_loss" in page and "valid_loss" in page and "n/a" in page
    assert "optim.name" in page and "adam" in page and "2024-01-01T00:00:00Z" in page


def test_user_text_is_escaped(evaluated: tuple[str, dict[str, float]]) -> None:
    page, _ = evaluated
    assert XSS not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "dcn<v2>" not in page and "dcn&lt;v2&gt;" in page
    assert "Eval <run-1>" not in page and "US & CA" not in page and "US &amp; CA" in page


def test_single_class_still_renders() -> None:
    y = np.zeros(200, dtype=np.int64)
    p = np.linspace(0.0, 1.0, 200)
    page = report.evaluation_report(title="degenerate", metrics={"auc": float("nan"), "rows": 200.0},
                                    curves=_curves(y, p))
    parsed = _parse(page)
    assert "ROC curve undefined" in page and parsed.svgs == 2 and "AUC=" not in page


def test_line_chart_clamps_and_drops_bad_points() -> None:
    svg = report.svg_line_chart(
        {"a": ([0, 1, 2, 3, 4], [0.5, float("nan"), 10.0, -3.0, float("inf")]), "one": ([2], [0.2]), "none": ([], [])},
        title="t", xlabel="x", ylabel="y", ylim=(0.0, 1.0), diagonal=True)
    parsed = _parse(svg)
    assert parsed.svgs == 1 and parsed.polylines == 2 and svg.count("<circle") == 4
    flat = report.svg_line_chart({"flat": ([1, 1], [5, 5])}, title="t", xlabel="x", ylabel="y")
    _parse(flat)


def test_bar_chart_and_histogram() -> None:
    svg = report.svg_bar_chart(["a", "b" * 40, XSS], [0.3, None, 0.9], title="bars", ylabel="v", ref=0.5)
    _parse(svg)
    assert svg.count("<rect") == 1 + 2 and "n/a" in svg and XSS not in svg and "b" * 40 in svg  # frame + 2 bars
    hist = report.svg_histogram({"x": np.array([0.1, 0.2, 0.2, 5.0, np.nan]), "empty": np.array([])},
                                bins=10, title="h", density=False)
    parsed = _parse(hist)
    assert parsed.polylines == 1 and "x (n=3)" in hist and "empty" not in hist
    binned = report.svg_histogram({"x": np.array([0.1, 0.2, 5.0])}, weights={"x": np.array([1, 2, 7])},
                                  bins=10, title="h", density=False)
    assert "x (n=3)" in binned and binned.split("<polyline")[1] == hist.split("<polyline")[1]


def test_results_page_renders_every_row() -> None:
    rows = [{"trial": f"t{i}", "lr": 10.0 ** -i, "auc": 0.7 + i / 100, "status": "ok"} for i in range(1, 8)]
    rows.append({"trial": XSS, "extra": "only-here"})
    chart = report.svg_bar_chart([r["trial"] for r in rows[:-1]], [r["auc"] for r in rows[:-1]],
                                 title="auc by trial", ylabel="auc")
    page = report.results_page(title="search", table=rows, charts=[chart], meta={"experiment": "exp1"})
    parsed = _parse(page)
    results = page.split("<h2>Results", 1)[1].split("</table>", 1)[0]
    assert parsed.svgs == 1 and results.count("<tr>") == len(rows) + 1  # header + one per row
    for r in rows[:-1]:
        assert f">{r['trial']}<" in page and f">{report.fmt(r['auc'])}<" in page
    assert "only-here" in page and XSS not in page and 'class="sort"' in page


def test_fmt() -> None:
    assert report.fmt(0.812345) == "0.8123" and report.fmt(4000.0) == "4,000" and report.fmt(12) == "12"
    assert report.fmt(1e-5) == "1e-05" and report.fmt(float("nan")) == "nan" and report.fmt(True) == "True"
    assert report.fmt(np.float32(0.5)) == "0.5000" and report.fmt("x") == "x"
