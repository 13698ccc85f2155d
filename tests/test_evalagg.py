"""training.evalagg: metrics from merged partial aggregates against training.evalmetrics' exact ones over the
same rows (fast, no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training import evalagg as ea
from training import evalmetrics as em

SEEDS = [0, 1, 2]


def _data(seed: int, n: int = 20_000, decimals: int | None = None):
    """CTR-like scores (logit-normal) and labels drawn from a true probability; rounding makes many ties."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-2.0, 1.5, n)
    p_true = 1 / (1 + np.exp(-z))
    y = (rng.random(n) < p_true).astype(np.float32)
    p = (1 / (1 + np.exp(-(z + rng.normal(0.0, 1.0, n))))).astype(np.float32).astype(np.float64)
    if decimals is not None:
        p = p.round(decimals)
    return y, p, rng.integers(0, n // 25, n), p_true, rng.integers(0, 6, n)


def _aggregate(y, p, o=None, s=None, chunks: int = 5, order=None, grid: ea.Grid = ea.GRID) -> ea.Aggregate:
    parts = [ea.partial(y[i], p[i], None if o is None else o[i], None if s is None else {"s": s[i]}, grid)
             for i in np.array_split(np.arange(y.size), chunks)]
    agg = ea.Aggregate(grid)
    for i in order if order is not None else range(chunks):
        agg.add(parts[i])
    return agg


def _groups(y, p, g) -> dict[str, float]:
    """Sums over parts of whole groups (as the cluster's parts are), merged."""
    sums = dict.fromkeys(ea.GROUP_SUMS, 0.0)
    for part in range(3):
        m = g % 3 == part
        for k, a in ea.group_sums_of(y[m], p[m], g[m]).items():
            sums[k] += a
    return ea.group_metrics(sums)


@pytest.mark.parametrize("seed,decimals", [(0, None), (1, None), (2, 3), (3, 2)])
def test_metrics_match_compute_metrics(seed: int, decimals: int | None) -> None:
    y, p, g, p_true, _ = _data(seed, decimals=decimals)
    exact = em.compute_metrics(y, p, group=g, p_true=p_true)
    got = _aggregate(y, p, p_true).metrics(oracle=True, groups=_groups(y, p, g))
    assert list(got) == ["auc", "auc_error_bound", *[k for k in exact if k != "auc"]]
    for k in ("auc", "bayes_auc", "bayes_ratio"):
        assert got[k] == pytest.approx(exact[k], abs=1e-5), k
    assert abs(got["auc"] - exact["auc"]) <= got["auc_error_bound"] + 1e-12
    if decimals is None:  # continuous scores: the bound itself is small
        assert got["auc_error_bound"] < 1e-5
    else:  # real ties only fall in one bin together: exact
        assert got["auc"] == pytest.approx(exact["auc"], abs=1e-12)
    for k in exact:
        if k not in ("auc", "bayes_auc", "bayes_ratio"):
            assert got[k] == pytest.approx(exact[k], rel=1e-9, abs=1e-12), k


def test_curves_and_slices() -> None:
    y, p, _, _, s = _data(4)
    agg = _aggregate(y, p, s=s)
    curves = agg.curves(roc_points=10**9)
    cal, ref = curves["calibration"], em.calibration(y, p)
    assert cal.keys() == ref.keys() and cal["bin_count"] == ref["bin_count"]
    for k in ("mean_prediction", "label_rate", "ece", "bin_mean_prediction", "bin_label_rate"):
        np.testing.assert_allclose(cal[k], ref[k], rtol=1e-9)
    fpr, tpr = curves["roc"]
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
    assert np.trapezoid(tpr, fpr) == pytest.approx(agg.metrics()["auc"], abs=1e-12)  # one point per bin
    tied = p.round(3)  # when every bin is one tie block, the curve is the exact one
    for got, ref in zip(_aggregate(y, tied).curves(roc_points=300)["roc"], em.roc_curve_points(y, tied, 300)):
        np.testing.assert_allclose(got, ref, rtol=1e-12)
    centre, rows = curves["scores"]["label 1"]
    assert rows.sum() == y.sum() and np.all(np.diff(centre) < 0) and abs(centre[0] - p.max()) < 1e-4
    slices = agg.slices("s", top=4)
    counts = np.bincount(s)
    assert [r["code"] for r in slices] == list(np.argsort(-counts, kind="stable")[:4])
    for r in slices:
        m = s == r["code"]
        assert r["rows"] == m.sum() and r["label_rate"] == pytest.approx(y[m].mean(), rel=1e-12)
        assert r["auc"] == pytest.approx(em.roc_auc(y[m], p[m]), abs=1e-3)  # the coarse slice grid


def test_merge_order_does_not_matter() -> None:
    y, p, _, p_true, s = _data(5, n=5000, decimals=3)
    a = _aggregate(y, p, p_true, s, chunks=7)
    b = _aggregate(y, p, p_true, s, chunks=7, order=[6, 2, 4, 0, 1, 5, 3])
    one = ea.Aggregate()
    one.add(ea.partial(y, p, p_true, {"s": s}))
    for other in (b, one):
        assert a.hist.keys() == other.hist.keys()
        assert all(np.array_equal(a.hist[k], other.hist[k]) for k in a.hist)
        np.testing.assert_allclose(a.cal, other.cal, rtol=1e-12)
        assert other.metrics(oracle=True) == pytest.approx(a.metrics(oracle=True), rel=1e-12)
    assert one.received < a.received  # fewer, fuller partials: fewer rows to the driver


def test_several_partials_in_one_table_add_up() -> None:
    """A batch of the partials' dataset can hold several partials: bins repeat within it."""
    import pyarrow as pa

    y, p, _, _, s = _data(6, n=4000, decimals=2)
    parts = [ea.partial(y[i], p[i], None, {"s": s[i]}) for i in np.array_split(np.arange(y.size), 3)]
    a, b = ea.Aggregate(), ea.Aggregate()
    a.add(pa.concat_tables(parts))
    b.add(ea.partial(y, p, None, {"s": s}))
    assert all(np.array_equal(a.hist[k], b.hist[k]) for k in b.hist) and a.hist.keys() == b.hist.keys()


def test_undefined_and_missing() -> None:
    p = np.linspace(0.0, 1.0, 50)
    agg = _aggregate(np.zeros(50), p, s=np.arange(50) % 2)
    m = agg.metrics(oracle=True)  # no oracle column given: no bayes metrics
    assert math.isnan(m["auc"]) and math.isnan(m["auc_error_bound"]) and "bayes_auc" not in m
    assert m["rows"] == 50 and m["positives"] == 0 and math.isnan(m["calibration_ratio"])
    assert all(math.isnan(r["auc"]) for r in agg.slices("s")) and agg.curves()["roc"] == ([], [])
    assert ea.group_metrics(dict.fromkeys(ea.GROUP_SUMS, 0.0)) == pytest.approx(
        {"gauc": math.nan, "ndcg@10": math.nan}, nan_ok=True)
    # unlabelled rows are left out (the caller compares row counts); an oracle with nan gives no bayes_auc
    y = np.array([0, 1, np.nan, 1, 0], np.float32)
    agg = _aggregate(y, np.array([0.1, 0.8, 0.5, 0.4, 0.3]), np.array([0.2, 0.7, 0.5, np.nan, 0.1]), chunks=2)
    assert agg.rows == 4 and "bayes_auc" not in agg.metrics(oracle=True)
    assert agg.metrics()["auc"] == em.roc_auc([0, 1, 1, 0], [0.1, 0.8, 0.4, 0.3])
    with pytest.raises(ValueError, match="0/1"):
        ea.partial(np.array([0.0, 2.0]), np.array([0.1, 0.2]))


def test_logit_bins_keep_order_and_ties() -> None:
    p = np.array([0.0, 1e-12, 1e-6, 0.2, 0.2, 0.2001, 0.5, 1 - 1e-6, 1.0])
    b = ea.logit_bin(p, ea.GRID.bins)
    assert np.all(np.diff(b) >= 0) and b[0] == 0 and b[-1] == ea.GRID.bins - 1 and b[3] == b[4] < b[5]
    assert np.max(np.abs(ea.bin_scores(ea.GRID.bins)[b[2:-1]] - p[2:-1])) < 1e-5


def test_merged_partials_give_the_same_metrics_in_one_row_per_cell() -> None:
    """What the cluster sends the driver: partials summed by (kind, key, bin), no bigger than the cells."""
    y, p, _, p_true, s = _data(5)
    parts = [ea.partial(y[i], p[i], p_true[i], {"s": s[i]}) for i in np.array_split(np.arange(y.size), 4)]
    merged = ea.merge(parts)
    cells = merged.select(["kind", "key", "bin"]).to_pylist()
    assert len(cells) == len({tuple(c.values()) for c in cells}) < sum(t.num_rows for t in parts)
    one, many = ea.Aggregate(), ea.Aggregate()
    one.add(merged)
    for t in parts:
        many.add(t)
    # equal up to the order of float additions (Arrow's grouped sums run in threads)
    assert one.metrics(oracle=True) == pytest.approx(many.metrics(oracle=True), rel=1e-12) and one.rows == y.size
