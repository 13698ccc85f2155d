"""training.evalmetrics against scikit-learn and hand-written references."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from training import evalmetrics as em

SEEDS = [0, 1, 2, 3, 4]


def _data(seed: int, n: int = 3000, n_groups: int = 120, decimals: int = 2):
    """Random labels correlated with scores; rounding scores creates many ties."""
    rng = np.random.default_rng(seed)
    p_true = rng.beta(1.0, 4.0, n)
    y = (rng.random(n) < p_true).astype(np.int64)
    p = np.clip(p_true + rng.normal(0.0, 0.15, n), 0.0, 1.0).round(decimals)
    group = rng.integers(0, n_groups, n)
    return y, p, group, p_true


@pytest.mark.parametrize("seed", SEEDS)
def test_roc_auc_matches_sklearn(seed: int) -> None:
    y, p, _, _ = _data(seed)
    assert em.roc_auc(y, p) == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)
    # Fully tied scores must give exactly 0.5.
    assert em.roc_auc(y, np.full(y.size, 0.3)) == pytest.approx(0.5)


def test_roc_auc_single_class_is_nan() -> None:
    assert math.isnan(em.roc_auc(np.ones(5), np.linspace(0, 1, 5)))


@pytest.mark.parametrize("seed", SEEDS)
def test_log_loss_matches_sklearn(seed: int) -> None:
    y, p, _, _ = _data(seed)
    p = np.clip(p, 0.01, 0.99)
    expected = skm.log_loss(y, p, labels=[0, 1])
    assert em.log_loss(y, p) == pytest.approx(expected, rel=1e-12)


def test_log_loss_clips_with_eps() -> None:
    y = np.array([1, 0])
    p = np.array([0.0, 1.0])
    assert em.log_loss(y, p, eps=1e-3) == pytest.approx(-math.log(1e-3))


@pytest.mark.parametrize("seed", SEEDS)
def test_gauc_matches_per_group_loop(seed: int) -> None:
    y, p, group, _ = _data(seed, n_groups=50)
    num = den = 0.0
    for g in np.unique(group):
        m = group == g
        if 0 < y[m].sum() < m.sum():
            num += m.sum() * skm.roc_auc_score(y[m], p[m])
            den += m.sum()
    assert em.gauc(y, p, group) == pytest.approx(num / den, abs=1e-12)
    # String keys and arbitrary row order must not change the result.
    perm = np.random.default_rng(seed).permutation(y.size)
    skeys = np.array([f"q{g}" for g in group])
    assert em.gauc(y[perm], p[perm], skeys[perm]) == pytest.approx(num / den, abs=1e-12)


def test_gauc_no_eligible_group_is_nan() -> None:
    assert math.isnan(em.gauc([1, 1, 0], [0.2, 0.4, 0.1], [0, 0, 1]))


def _ndcg_reference(y, p, group, k: int) -> float:
    scores = []
    for g in np.unique(group):
        m = group == g
        if y[m].sum() == 0:
            continue
        if m.sum() == 1:  # sklearn refuses single-document queries
            scores.append(1.0)
            continue
        scores.append(skm.ndcg_score(y[m][None, :], p[m][None, :], k=k))
    return float(np.mean(scores))


@pytest.mark.parametrize("seed", SEEDS[:3])
@pytest.mark.parametrize("k", [1, 5, 10])
def test_ndcg_matches_sklearn_with_ties(seed: int, k: int) -> None:
    # decimals=1 gives heavy ties; both sides average gains over tie blocks.
    y, p, group, _ = _data(seed, n=1200, n_groups=100, decimals=1)
    expected = _ndcg_reference(y, p, group, k)
    assert em.ndcg_at_k(y, p, group, k=k) == pytest.approx(expected, abs=1e-12)
    perm = np.random.default_rng(seed).permutation(y.size)
    assert em.ndcg_at_k(y[perm], p[perm], group[perm], k=k) == pytest.approx(expected, abs=1e-12)


def test_ndcg_perfect_ranking_is_one() -> None:
    y = np.array([1, 0, 0, 1, 0])
    p = np.array([0.9, 0.1, 0.2, 0.8, 0.3])
    assert em.ndcg_at_k(y, p, np.zeros(5, dtype=int), k=3) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", SEEDS)
def test_calibration_matches_hand_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    p = rng.random(5000) ** 2
    y = (rng.random(5000) < p).astype(int)
    bins = 10
    ece = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        m = (p >= lo) & ((p < hi) if b < bins - 1 else (p <= hi))
        if m.any():
            ece += m.sum() / p.size * abs(p[m].mean() - y[m].mean())
    cal = em.calibration(y, p, bins=bins)
    assert cal["ece"] == pytest.approx(ece, abs=1e-12)
    assert cal["calibration_ratio"] == pytest.approx(p.mean() / y.mean())
    assert sum(cal["bin_count"]) == p.size and len(cal["bin_label_rate"]) == bins
    json.dumps(cal)


def test_calibration_empty_bins_and_p_equal_one() -> None:
    cal = em.calibration([0, 1, 1], [0.05, 1.0, 0.95], bins=4)
    assert cal["bin_count"] == [1, 0, 0, 2]
    assert cal["bin_mean_prediction"][1] is None


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_roc_curve_points_match_sklearn(seed: int) -> None:
    y, p, _, _ = _data(seed)
    fpr, tpr, _ = skm.roc_curve(y, p, drop_intermediate=False)
    got_f, got_t = em.roc_curve_points(y, p, max_points=10_000)
    np.testing.assert_allclose(got_f, fpr)
    np.testing.assert_allclose(got_t, tpr)
    small_f, small_t = em.roc_curve_points(y, p, max_points=20)
    assert len(small_f) == len(small_t) <= 20
    assert (small_f[0], small_t[0], small_f[-1], small_t[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(small_f) >= 0) and np.all(np.diff(small_t) >= 0)
    assert em.roc_curve_points(np.zeros(3), [0.1, 0.2, 0.3]) == ([], [])


def test_compute_metrics_keys_types_and_bayes_ratio() -> None:
    y, p, group, p_true = _data(0)
    out = em.compute_metrics(y, p, group=group, p_true=p_true, k=5)
    for key in ("auc", "logloss", "mean_prediction", "label_rate", "calibration_ratio",
                "ece", "rows", "positives", "gauc", "ndcg@5", "bayes_auc", "bayes_ratio"):
        assert type(out[key]) is float, key
    assert out["rows"] == y.size and out["positives"] == y.sum()
    assert out["bayes_auc"] == pytest.approx(skm.roc_auc_score(y, p_true))
    assert 0.0 < out["bayes_ratio"] < 1.0
    same = em.compute_metrics(y, p, p_true=p)
    assert same["bayes_ratio"] == pytest.approx(1.0)
    assert "gauc" not in same and "ndcg@10" not in same
    json.dumps(out)


@pytest.mark.parametrize(
    ("y", "p", "kwargs", "match"),
    [
        ([0, 2, 1], [0.1, 0.2, 0.3], {}, "y must contain only 0/1"),
        ([[0, 1]], [[0.1, 0.2]], {}, "y must be 1-D"),
        ([], [], {}, "y is empty"),
        ([0, 1, 1], [0.1, 0.2], {}, "p has shape"),
        ([0, 1], [0.1, 1.5], {}, r"p must lie in \[0, 1\]"),
        ([0, 1], [0.1, float("nan")], {}, "p contains nan"),
        ([0, 1], [0.1, 0.9], {"p_true": [0.1, -0.2]}, r"p_true must lie in \[0, 1\]"),
        ([0, 1], [0.1, 0.9], {"p_true": [0.1]}, "p_true has shape"),
        ([0, 1], [0.1, 0.9], {"group": [1, 2, 3]}, "group has shape"),
    ],
)
def test_bad_inputs_name_the_argument(y, p, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        em.compute_metrics(y, p, **kwargs)
