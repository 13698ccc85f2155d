"""A split's metrics from mergeable partial aggregates, so that evaluating a split never gathers its rows.

Each batch of scored rows becomes a small table of its non-zero bins (`partial`); `Aggregate.add` sums such
tables, in any order, into fixed-size arrays, from which come the metrics, the report's curves and the
slices. Scores are binned on a fine grid in logit space (where CTR-like scores spread out, unlike p near 0):
AUC counts the rows of one bin as tied, which is exact for real ties (GBDT leaves) and otherwise off by at
most `auc_error_bound`. Logloss, calibration, rows and positives are exact sums. Group metrics need each
group's rows together: `group_sums_of` gives the shares of whole groups, `group_metrics` turns their sums
into gauc and ndcg."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

from training.evalmetrics import (_group_metrics, _labels, _preds, auc_from_counts, calibration_bin,
                                  calibration_summary, loss_terms, roc_from_counts)

LOGIT_MAX = 16.0  # logits clipped to [-16, 16]: scores within 1.1e-7 of 0 or 1 share the end bins
CAL_BINS = 10  # compute_metrics' ece bins
K = 10  # ndcg@K
COLUMNS = ("kind", "key", "bin", "pos", "neg", "sum_p", "sum_loss")
GROUP_SUMS = ("auc_sum", "auc_rows", "ndcg_sum", "ndcg_groups")


@dataclass(frozen=True)
class Grid:
    bins: int = 2**20  # the scores' and the oracle's histograms: 2 x 16 MiB on the driver, AUC error ~1e-6
    slice_bins: int = 2**14  # each slice value's (at most 50 values per feature): 256 KiB each


GRID = Grid()


def logit_bin(p: NDArray[np.float64], bins: int) -> NDArray[np.int64]:
    """Bin of each score on `bins` equal steps of logit in [-LOGIT_MAX, LOGIT_MAX]; monotone in p, so equal
    scores share a bin and a higher score never gets a lower bin."""
    with np.errstate(divide="ignore"):  # p = 0 or 1: an infinite logit, clipped to an end bin
        z = np.clip(np.log(p) - np.log1p(-p), -LOGIT_MAX, LOGIT_MAX)
    return np.minimum(((z + LOGIT_MAX) * (bins / (2 * LOGIT_MAX))).astype(np.int64), bins - 1)


def bin_scores(bins: int) -> NDArray[np.float64]:
    """The score at the centre of each logit bin."""
    z = (np.arange(bins) + 0.5) * (2 * LOGIT_MAX / bins) - LOGIT_MAX
    return 1.0 / (1.0 + np.exp(-z))


def _count(kind: str, key: NDArray[np.int64], b: NDArray[np.int64], nbins: int, y: NDArray[np.float64],
           p: NDArray[np.float64] | None = None, loss: NDArray[np.float64] | None = None) -> dict[str, Any]:
    """Rows, positives (and sums of p and loss) per non-zero (key, bin)."""
    cell, inv = np.unique(key * nbins + b, return_inverse=True)
    rows = np.bincount(inv, minlength=cell.size)
    pos = np.bincount(inv, weights=y, minlength=cell.size).astype(np.int64)
    zero = np.zeros(cell.size)
    return {"kind": [kind] * cell.size, "key": cell // nbins, "bin": cell % nbins, "pos": pos, "neg": rows - pos,
            "sum_p": zero if p is None else np.bincount(inv, weights=p, minlength=cell.size),
            "sum_loss": zero if loss is None else np.bincount(inv, weights=loss, minlength=cell.size)}


def partial(y: NDArray[Any], p: NDArray[Any], o: NDArray[Any] | None = None,
            slices: dict[str, NDArray[Any]] | None = None, grid: Grid = GRID) -> pa.Table:
    """One batch's partial aggregate: its non-zero bins as rows of COLUMNS. Kinds: "cal" (calibration bins,
    with the sums of p and loss: exact logloss, ece, rows and positives), "p" and "o" (logit histograms of
    the scores and of the oracle's probabilities), "slice:NAME" (key = the feature's code). Rows without a
    label are left out (the caller compares rows) and so are the oracle's nan."""
    keep = ~np.isnan(np.asarray(y, np.float64))
    if not keep.any():
        return pa.table({c: pa.array([], t) for c, t in zip(COLUMNS, (pa.string(), *[pa.int64()] * 4,
                                                                        pa.float64(), pa.float64()))})
    yv = _labels(np.asarray(y, np.float64)[keep])
    pv = _preds(np.asarray(p, np.float64)[keep], yv.size)
    one = np.zeros(yv.size, np.int64)
    parts = [_count("cal", one, calibration_bin(pv, CAL_BINS), CAL_BINS, yv, pv, loss_terms(yv, pv)),
             _count("p", one, logit_bin(pv, grid.bins), grid.bins, yv)]
    ov = np.full(yv.size, np.nan) if o is None else np.asarray(o, np.float64)[keep]
    if (has := ~np.isnan(ov)).any():
        parts.append(_count("o", one[has], logit_bin(_preds(ov[has], has.sum(), "o"), grid.bins), grid.bins, yv[has]))
    for name, codes in (slices or {}).items():
        parts.append(_count(f"slice:{name}", np.asarray(codes, np.int64)[keep], logit_bin(pv, grid.slice_bins),
                            grid.slice_bins, yv))
    return pa.table({c: np.concatenate([part[c] for part in parts]) for c in COLUMNS})


def merge(tables: list[pa.Table]) -> pa.Table:
    """Partial aggregates summed into one, a row per (kind, key, bin): as big as the cells they hold, however
    many rows they counted."""
    t = pa.concat_tables(tables)
    sums = [c for c in COLUMNS if c not in ("kind", "key", "bin")]
    out = t.group_by(["kind", "key", "bin"]).aggregate([(c, "sum") for c in sums])
    return out.rename_columns([c.removesuffix("_sum") if c[:-4] in sums else c for c in out.column_names]).select(COLUMNS)


class Aggregate:
    """Partial aggregates summed in fixed-size arrays: memory depends on the grid, not on the rows."""

    def __init__(self, grid: Grid = GRID) -> None:
        self.grid = grid
        self.cal = np.zeros((4, CAL_BINS))  # rows, positives, sum of p, sum of loss per calibration bin
        self.hist: dict[tuple[str, int], NDArray[np.int64]] = {}  # (kind, key) -> [negatives, positives] per bin
        self.received = 0  # partial rows added: what reached the driver

    @property
    def rows(self) -> int:
        return int(self.cal[0].sum())

    def add(self, t: pa.Table) -> None:
        self.received += t.num_rows
        for kind in pc.unique(t["kind"]).to_pylist():
            part = t.filter(pc.equal(t["kind"], kind))
            key, b, pos, neg = (part[c].to_numpy() for c in ("key", "bin", "pos", "neg"))
            if kind == "cal":
                for row, v in zip(self.cal, (pos + neg, pos, part["sum_p"].to_numpy(), part["sum_loss"].to_numpy())):
                    np.add.at(row, b, v)
                continue
            nbins = self.grid.slice_bins if kind.startswith("slice:") else self.grid.bins
            for k in np.unique(key):
                h = self.hist.setdefault((kind, int(k)), np.zeros((2, nbins), np.int64))
                m = key == k
                np.add.at(h[0], b[m], neg[m])  # add.at: a batch of several partials may repeat a bin
                np.add.at(h[1], b[m], pos[m])

    def _hist(self, kind: str, key: int = 0) -> NDArray[np.int64]:
        return self.hist.get((kind, key), np.zeros((2, 1), np.int64))

    def metrics(self, oracle: bool = False, groups: dict[str, float] | None = None) -> dict[str, float]:
        """`compute_metrics`' keys and order (gauc and ndcg from `group_metrics`' `groups`; bayes_auc when
        `oracle` and every row had one), plus `auc_error_bound`: how far the binned AUC can be from the exact."""
        rows, positives, sum_p, sum_loss = self.cal
        n = rows.sum()
        cal = calibration_summary(rows, sum_p, positives)
        neg, pos = self._hist("p")
        out = {"auc": auc_from_counts(pos, pos + neg), "auc_error_bound": _bin_error_bound(pos, neg),
               "logloss": float(sum_loss.sum() / n)}
        out |= {k: cal[k] for k in ("mean_prediction", "label_rate", "calibration_ratio", "ece")}
        out |= {"rows": float(n), "positives": float(positives.sum())}
        out |= groups or {}
        o_neg, o_pos = self._hist("o")
        if oracle and (o_neg.sum() + o_pos.sum()) == n:
            out["bayes_auc"] = bayes = auc_from_counts(o_pos, o_pos + o_neg)
            out["bayes_ratio"] = (out["auc"] - 0.5) / (bayes - 0.5) if bayes != 0.5 else float("nan")
        return out

    def curves(self, roc_points: int = 300) -> dict[str, Any]:
        """What the report draws: ROC points (one per non-empty bin, downsampled), the calibration bins, and
        the scores by label as weighted values (each bin's centre, its rows)."""
        neg, pos = self._hist("p")
        nz = np.flatnonzero(neg + pos)[::-1]  # highest score first
        centre = bin_scores(self.grid.bins)[nz]
        rows, positives, sum_p, _ = self.cal
        return {"roc": roc_from_counts(pos[nz], neg[nz], roc_points),
                "calibration": calibration_summary(rows, sum_p, positives),
                "scores": {"label 0": (centre, neg[nz]), "label 1": (centre, pos[nz])}}

    def slices(self, name: str, top: int = 8) -> list[dict[str, Any]]:
        """The `top` values of a slice feature by rows (code order among equals): code, rows, label rate, AUC."""
        codes = sorted(k for kind, k in self.hist if kind == f"slice:{name}")
        hists = [self.hist[(f"slice:{name}", c)] for c in codes]
        out = []
        for i in np.argsort([-h.sum() for h in hists], kind="stable")[:top]:
            neg, pos = hists[i]
            n = int(neg.sum() + pos.sum())
            out.append({"code": codes[i], "rows": n, "label_rate": float(pos.sum() / n),
                        "auc": auc_from_counts(pos, pos + neg)})
        return out


def _bin_error_bound(pos: NDArray[np.int64], neg: NDArray[np.int64]) -> float:
    """Bound on |binned AUC - exact AUC|: each positive/negative pair in one bin counts 1/2, its exact share
    is 0, 1/2 (a real tie) or 1."""
    pairs = float(pos.sum()) * float(neg.sum())
    return 0.5 * float(pos.astype(np.float64) @ neg) / pairs if pairs else float("nan")


def group_sums_of(y: NDArray[Any], p: NDArray[Any], g: NDArray[Any]) -> dict[str, float]:
    """The GROUP_SUMS of whole groups' rows (every row of each group present): gauc's AUC x rows and rows over
    the groups with both classes, ndcg@K's sum and count over the groups with a positive (`_group_metrics`)."""
    yv = _labels(np.asarray(y, np.float64))
    auc, ndcg = _group_metrics(yv, _preds(np.asarray(p, np.float64), yv.size), g, K)
    inv = np.unique(np.asarray(g), return_inverse=True)[1].reshape(-1)
    rows, pos = np.bincount(inv).astype(np.float64), np.bincount(inv, weights=yv)
    auc_rows, ndcg_groups = float(rows[(pos > 0) & (pos < rows)].sum()), float((pos > 0).sum())
    return {"auc_sum": auc * auc_rows if auc_rows else 0.0, "auc_rows": auc_rows,
            "ndcg_sum": ndcg * ndcg_groups if ndcg_groups else 0.0, "ndcg_groups": ndcg_groups}


def group_metrics(sums: dict[str, float]) -> dict[str, float]:
    """gauc and ndcg@K from the GROUP_SUMS over every group (nan where no group qualifies)."""
    return {"gauc": sums["auc_sum"] / sums["auc_rows"] if sums["auc_rows"] else float("nan"),
            f"ndcg@{K}": sums["ndcg_sum"] / sums["ndcg_groups"] if sums["ndcg_groups"] else float("nan")}
