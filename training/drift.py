"""Drift of served traffic against the training distribution, per feature and for the score.

A bundle stores the reference (`drift.json`): for each feature, the share of a training sample in fixed
bins of its encoded values (numeric: the sample's deciles in the model's units; categorical and multi-hot:
the 20 most frequent ids, every other known id, and out-of-vocabulary), and the same for the score
(deciles). A serving replica counts its rows in the same bins over a decaying window and reports, per
feature, the population stability index PSI = sum((a - e) * ln(a / e)) of served shares a against
training shares e, and the out-of-vocabulary rate. Common reading: below 0.1 no real change, 0.1-0.2 a
moderate one, above PSI_ALERT (0.2) a shift worth an alert.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from training.features import OOV, PAD, Preprocessor

PSI_ALERT = 0.2
TOP_IDS = 20
DECILES = np.linspace(0, 1, 11)[1:-1]
SAMPLE_ROWS = 50_000  # training rows the reference is taken from
EPS = 1e-4  # the least share a bin is given, so an empty one does not make the index infinite


def _edges(x: np.ndarray) -> list[float]:
    return np.unique(np.quantile(x, DECILES)).tolist() if len(x) else []


def _slot_cols(pp: Preprocessor) -> dict[str, list[int]]:
    """Each categorical or multi-hot feature's columns in packed rows."""
    where = {c: k for k, c in enumerate(pp.cat_columns)}
    return {f.name: [where[c] for c in pp.slots(f)] for f in pp.cat_features}


def _cat_ids(cols: list[int], x_cat: np.ndarray) -> np.ndarray:
    """The ids of one feature's columns in packed rows (every slot, padding left out)."""
    ids = x_cat[:, cols].ravel()
    return ids[ids != PAD]


def reference(pp: Preprocessor, x_cat: np.ndarray, x_num: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """The bins and training shares of every feature and of the score, from packed training rows."""
    feats: dict[str, Any] = {}
    for i, f in enumerate(pp.num_features):
        z = x_num[:, i]
        edges = _edges(z)
        feats[f.name] = {"kind": "numeric", "edges": edges, "p": _shares(np.searchsorted(edges, z, "right"),
                                                                         len(edges) + 1)}
    for name, cols in _slot_cols(pp).items():
        ids = _cat_ids(cols, x_cat)
        known, counts = np.unique(ids[ids != OOV], return_counts=True)
        top = known[np.argsort(-counts, kind="stable")[:TOP_IDS]].tolist()
        feats[name] = {"kind": "categorical", "ids": top, "p": _shares(_cat_bins(ids, top), len(top) + 2)}
    edges = _edges(scores)
    return {"rows": int(len(scores)), "features": feats,
            "score": {"edges": edges, "p": _shares(np.searchsorted(edges, scores, "right"), len(edges) + 1)}}


def _cat_bins(ids: np.ndarray, top: list[int]) -> np.ndarray:
    """Bin of each id: its place among the top ids, then 'other known' (len(top)), then OOV (len(top) + 1)."""
    out = np.full(len(ids), len(top), np.int64)
    if top:
        order = np.argsort(top)
        ranked = np.asarray(top)[order]
        pos = np.minimum(np.searchsorted(ranked, ids), len(top) - 1)
        hit = ranked[pos] == ids
        out[hit] = order[pos[hit]]
    out[ids == OOV] = len(top) + 1
    return out


def _shares(bins: np.ndarray, n: int) -> list[float]:
    counts = np.bincount(bins, minlength=n).astype(np.float64)
    return (counts / max(counts.sum(), 1.0)).tolist()


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    e = np.maximum(np.asarray(expected, np.float64), EPS)
    a = np.maximum(np.asarray(actual, np.float64), EPS)
    return float(np.sum((a - e) * np.log(a / e)))


class DriftMonitor:
    """Served rows counted in the reference's bins over a window of about `window` rows (older rows fade
    out exponentially), so the index follows today's traffic rather than the replica's whole life."""

    def __init__(self, pp: Preprocessor, ref: dict[str, Any], window: int) -> None:
        self.pp, self.ref, self.window = pp, ref, window
        self.cols = _slot_cols(pp)  # per batch in the serving path: looked up once here
        self.counts = {name: np.zeros(len(r["p"])) for name, r in ref["features"].items()}
        self.score_counts = np.zeros(len(ref["score"]["p"]))
        self.rows = 0

    def update(self, x_cat: np.ndarray, x_num: np.ndarray, scores: np.ndarray) -> None:
        keep = math.exp(-len(scores) / self.window)
        for i, f in enumerate(self.pp.num_features):
            r = self.ref["features"].get(f.name)
            if r is not None:
                self._add(f.name, np.searchsorted(r["edges"], x_num[:, i], "right"), keep)
        for name, cols in self.cols.items():
            r = self.ref["features"].get(name)
            if r is not None:
                self._add(name, _cat_bins(_cat_ids(cols, x_cat), r["ids"]), keep)
        bins = np.searchsorted(self.ref["score"]["edges"], scores, "right")
        self.score_counts = self.score_counts * keep + np.bincount(bins, minlength=len(self.score_counts))
        self.rows += len(scores)

    def _add(self, name: str, bins: np.ndarray, keep: float) -> None:
        c = self.counts[name]
        self.counts[name] = c * keep + np.bincount(bins, minlength=len(c))

    def report(self) -> dict[str, Any]:
        """{rows, window, alert_above, score_psi, features: {name: {psi, oov_rate (categorical)}}}."""
        feats = {}
        for name, c in self.counts.items():
            r = self.ref["features"][name]
            total = c.sum()
            a = c / total if total else np.asarray(r["p"])
            out = {"psi": round(psi(r["p"], a), 6)}
            if r["kind"] == "categorical":
                out["oov_rate"] = round(float(a[-1]), 6)
                out["train_oov_rate"] = round(float(r["p"][-1]), 6)
            feats[name] = out
        s = self.score_counts
        score_psi = psi(self.ref["score"]["p"], s / s.sum()) if s.sum() else 0.0
        return {"rows": self.rows, "window": self.window, "alert_above": PSI_ALERT,
                "score_psi": round(score_psi, 6), "features": feats}
