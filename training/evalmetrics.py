"""Exact evaluation metrics over whole in-memory arrays (pure numpy); the count-based helpers are shared with
`training.evalagg`, which computes a split's metrics from mergeable partial aggregates.

All functions take 1-D arrays: ``y`` binary labels (0/1), ``p`` predicted
probabilities in [0, 1], ``group`` any sortable key per row (query/user id).
Metrics that are undefined (single class, no eligible group) return nan.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "roc_auc", "log_loss", "gauc", "ndcg_at_k", "calibration", "compute_metrics",
    "roc_curve_points", "auc_from_counts", "loss_terms", "calibration_bin", "calibration_summary", "roc_from_counts",
]


def _labels(y: ArrayLike) -> NDArray[np.float64]:
    a = np.asarray(y)
    if a.ndim != 1:
        raise ValueError(f"y must be 1-D, got shape {a.shape}")
    if a.size == 0:
        raise ValueError("y is empty")
    if a.dtype.kind not in "biuf" or not ((a == 0) | (a == 1)).all():
        raise ValueError("y must contain only 0/1 labels")
    return a.astype(np.float64, copy=False)


def _preds(p: ArrayLike, n: int, name: str = "p") -> NDArray[np.float64]:
    a = np.asarray(p)
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"{name} has shape {a.shape} but y has length {n}")
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    a = a.astype(np.float64, copy=False)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains nan or inf")
    if a.min() < 0.0 or a.max() > 1.0:
        raise ValueError(f"{name} must lie in [0, 1]")
    return a


def _groups(group: ArrayLike, n: int) -> NDArray[Any]:
    """Integer key per row, equal iff same group (only sorted, never indexed by)."""
    a = np.asarray(group)
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"group has shape {a.shape} but y has length {n}")
    # Integer ids are used as-is; factorizing them would cost a full extra sort.
    return a if a.dtype.kind in "biu" else np.unique(a, return_inverse=True)[1].reshape(-1)


def _block_starts(*sorted_keys: NDArray[Any]) -> NDArray[np.intp]:
    """Start index of each run of equal key tuples in already-sorted arrays."""
    n = sorted_keys[0].shape[0]
    change = np.zeros(n, dtype=bool)
    change[0] = True
    for k in sorted_keys:
        change[1:] |= k[1:] != k[:-1]
    return np.flatnonzero(change)


def _avg_ranks(starts: NDArray[np.intp], n: int) -> NDArray[np.float64]:
    """1-based ranks with ties averaged, given tie-block starts in sorted order."""
    ends = np.append(starts[1:], n)
    return np.repeat((starts + ends + 1) / 2.0, ends - starts)


def auc_from_counts(pos: NDArray[np.float64], count: NDArray[np.float64]) -> float:
    """Mann-Whitney AUC from the positives and rows of each tie block (or score bin), blocks in ascending
    score order; rows of one block are ties (average rank)."""
    n_pos = pos.sum()
    n_neg = count.sum() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    starts = np.cumsum(count) - count
    rank_sum = pos @ ((2.0 * starts + count + 1.0) / 2.0)
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _tie_blocks(ys: NDArray[np.float64], ps: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(positives, rows) of each run of equal scores in score-sorted rows."""
    starts = _block_starts(ps)
    return np.add.reduceat(ys, starts), np.diff(np.append(starts, ps.size)).astype(np.float64)


def _auc_sorted(ys: NDArray[np.float64], ps: NDArray[np.float64]) -> float:
    """Mann-Whitney AUC from labels/scores already sorted by ascending score."""
    return auc_from_counts(*_tie_blocks(ys, ps))


def roc_auc(y: ArrayLike, p: ArrayLike) -> float:
    """Exact ROC AUC via the Mann-Whitney rank sum with tied scores averaged."""
    yv = _labels(y)
    pv = _preds(p, yv.size)
    order = np.argsort(pv)
    return _auc_sorted(yv[order], pv[order])


def log_loss(y: ArrayLike, p: ArrayLike, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy with p clipped to [eps, 1 - eps]."""
    yv = _labels(y)
    return float(np.mean(loss_terms(yv, _preds(p, yv.size), eps)))


def loss_terms(yv: NDArray[np.float64], pv: NDArray[np.float64], eps: float = 1e-7) -> NDArray[np.float64]:
    """Each row's binary cross-entropy, p clipped to [eps, 1 - eps]."""
    pv = np.clip(pv, eps, 1.0 - eps)
    return -(yv * np.log(pv) + (1.0 - yv) * np.log1p(-pv))


def _group_metrics(
    yv: NDArray[np.float64], pv: NDArray[np.float64], group: ArrayLike, k: int,
    by_p: NDArray[np.intp] | None = None,
) -> tuple[float, float]:
    """(gauc, ndcg@k) from a single sort by (group, ascending score)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = yv.size
    gid = _groups(group, n)
    by_p = np.argsort(pv) if by_p is None else by_p
    # Stable integer sort of the score-sorted rows reuses the score sort that
    # compute_metrics already did; much cheaper than np.lexsort((p, gid)).
    order = by_p[np.argsort(gid[by_p], kind="stable")]
    gs, ps, ys = gid[order], pv[order], yv[order]
    g_start = _block_starts(gs)
    g_end = np.append(g_start[1:], n)
    size = (g_end - g_start).astype(np.float64)
    t_start = _block_starts(gs, ps)  # tie blocks never straddle groups
    n_pos = np.add.reduceat(ys, g_start)
    n_neg = size - n_pos

    # GAUC: global average ranks minus the group's start offset are exactly
    # the within-group average ranks.
    rank_sum = np.add.reduceat(_avg_ranks(t_start, n) * ys, g_start) - n_pos * g_start
    ok = (n_pos > 0) & (n_neg > 0)
    auc = (rank_sum[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2.0) / (n_pos[ok] * n_neg[ok])
    gauc_v = float(np.average(auc, weights=size[ok])) if ok.any() else float("nan")

    # NDCG: rows are ascending, so the 0-based position from the top is the
    # distance to the group's last row.
    top = np.repeat(g_end, (g_end - g_start)) - 1 - np.arange(n)
    disc = np.where(top < k, 1.0 / np.log2(top + 2.0), 0.0)
    t_len = np.diff(np.append(t_start, n))
    row_gain = np.repeat(np.add.reduceat(ys, t_start) / t_len, t_len)  # tie-averaged
    dcg = np.add.reduceat(row_gain * disc, g_start)
    ideal_cum = np.concatenate(([0.0], np.cumsum(1.0 / np.log2(np.arange(min(k, n)) + 2.0))))
    idcg = ideal_cum[np.minimum(n_pos.astype(np.intp), k)]
    has_pos = n_pos > 0
    ndcg_v = float(np.mean(dcg[has_pos] / idcg[has_pos])) if has_pos.any() else float("nan")
    return gauc_v, ndcg_v


def gauc(y: ArrayLike, p: ArrayLike, group: ArrayLike) -> float:
    """Group AUC: per-group tie-aware AUC averaged with weight = group row count.

    Only groups containing both a positive and a negative are included (AUC is
    undefined otherwise); nan if there are none.
    """
    yv = _labels(y)
    return _group_metrics(yv, _preds(p, yv.size), group, k=1)[0]


def ndcg_at_k(y: ArrayLike, p: ArrayLike, group: ArrayLike, k: int = 10) -> float:
    """Mean NDCG@k over groups with at least one positive (binary gains).

    Discount is 1/log2(rank + 1). Tied scores are handled like sklearn's
    ``ndcg_score`` (ignore_ties=False): each tie block gets its mean gain times
    the sum of the discounts of the positions it occupies, so the result does
    not depend on row order. Ideal DCG comes from the labels sorted descending.
    """
    yv = _labels(y)
    return _group_metrics(yv, _preds(p, yv.size), group, k=k)[1]


def calibration(y: ArrayLike, p: ArrayLike, bins: int = 10) -> dict[str, Any]:
    """Global calibration plus equal-width reliability bins on [0, 1].

    ``ece`` is the count-weighted mean |bin mean prediction - bin label rate|.
    Per-bin lists have ``bins`` entries; empty bins report None for the means.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    yv = _labels(y)
    pv = _preds(p, yv.size)
    idx = calibration_bin(pv, bins)
    return calibration_summary(np.bincount(idx, minlength=bins), np.bincount(idx, weights=pv, minlength=bins),
                               np.bincount(idx, weights=yv, minlength=bins))


def calibration_bin(p: NDArray[np.float64], bins: int = 10) -> NDArray[np.intp]:
    """Equal-width bin of each p in [0, 1]; p == 1.0 belongs to the last bin, not an extra one."""
    return np.minimum((p * bins).astype(np.intp), bins - 1)


def calibration_summary(count: NDArray[Any], sum_p: NDArray[np.float64], sum_y: NDArray[np.float64]) -> dict[str, Any]:
    """`calibration`'s result from each bin's rows, sum of p and sum of labels."""
    bins, n = count.size, count.sum()
    nz = count > 0
    bin_p = np.divide(sum_p, count, out=np.zeros(bins), where=nz)
    bin_y = np.divide(sum_y, count, out=np.zeros(bins), where=nz)
    ece = float(np.sum(count * np.abs(bin_p - bin_y)) / n)
    mean_p, rate = float(sum_p.sum() / n), float(sum_y.sum() / n)
    return {
        "mean_prediction": mean_p,
        "label_rate": rate,
        "calibration_ratio": mean_p / rate if rate > 0 else float("nan"),
        "ece": ece,
        "bin_edges": np.linspace(0.0, 1.0, bins + 1).tolist(),
        "bin_mean_prediction": [float(v) if c else None for v, c in zip(bin_p, nz)],
        "bin_label_rate": [float(v) if c else None for v, c in zip(bin_y, nz)],
        "bin_count": [int(c) for c in count],
    }


def roc_curve_points(
    y: ArrayLike, p: ArrayLike, max_points: int = 200
) -> tuple[list[float], list[float]]:
    """ROC (fpr, tpr) at every distinct threshold from (0,0) to (1,1), downsampled.

    Downsampling keeps both endpoints and evenly spaced thresholds in between.
    Returns empty lists when y has a single class (the curve is undefined).
    """
    if max_points < 2:
        raise ValueError(f"max_points must be >= 2, got {max_points}")
    yv = _labels(y)
    pv = _preds(p, yv.size)
    order = np.argsort(-pv, kind="stable")
    pos, count = _tie_blocks(yv[order], pv[order])
    return roc_from_counts(pos, count - pos, max_points)


def roc_from_counts(pos: NDArray[Any], neg: NDArray[Any], max_points: int = 200) -> tuple[list[float], list[float]]:
    """`roc_curve_points` from the positives and negatives of each tie block (or score bin), highest score
    first: one point per threshold between blocks."""
    tps = np.concatenate(([0.0], np.cumsum(pos, dtype=np.float64)))
    fps = np.concatenate(([0.0], np.cumsum(neg, dtype=np.float64)))
    if tps[-1] == 0 or fps[-1] == 0:
        return [], []
    fpr, tpr = fps / fps[-1], tps / tps[-1]
    if fpr.size > max_points:
        keep = np.unique(np.linspace(0, fpr.size - 1, max_points).round().astype(np.intp))
        fpr, tpr = fpr[keep], tpr[keep]
    return fpr.tolist(), tpr.tolist()


def compute_metrics(
    y: ArrayLike, p: ArrayLike, group: ArrayLike | None = None,
    p_true: ArrayLike | None = None, k: int = 10,
) -> dict[str, float]:
    """All split metrics as plain Python floats (nan where undefined).

    Adds ``gauc`` and ``ndcg@{k}`` when ``group`` is given, and ``bayes_auc``
    (AUC of the true probabilities) and ``bayes_ratio`` =
    (auc - 0.5) / (bayes_auc - 0.5) when ``p_true`` is given.
    """
    yv = _labels(y)
    pv = _preds(p, yv.size)
    pt = None if p_true is None else _preds(p_true, yv.size, "p_true")
    cal = calibration(yv, pv)
    by_p = np.argsort(pv)  # shared by auc, gauc and ndcg
    out: dict[str, float] = {
        "auc": _auc_sorted(yv[by_p], pv[by_p]),
        "logloss": log_loss(yv, pv),
        "mean_prediction": cal["mean_prediction"],
        "label_rate": cal["label_rate"],
        "calibration_ratio": cal["calibration_ratio"],
        "ece": cal["ece"],
        "rows": float(yv.size),
        "positives": float(yv.sum()),
    }
    if group is not None:
        out["gauc"], out[f"ndcg@{k}"] = _group_metrics(yv, pv, group, k, by_p)
    if pt is not None:
        out["bayes_auc"] = bayes = roc_auc(yv, pt)
        out["bayes_ratio"] = (out["auc"] - 0.5) / (bayes - 0.5) if bayes != 0.5 else float("nan")
    return out
