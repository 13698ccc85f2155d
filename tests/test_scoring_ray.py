"""One scoring path: the same rows get the same score from training's evaluation (the loop's `predict` and
the driver's pass over the encoded test split), `rankray evaluate` (raw rows through the bundle's own
transform), the bundle (its recorded sample scores and self-check) and the served model over HTTP."""
from __future__ import annotations

from contextlib import nullcontext

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray
import torch
from ray import serve

from serving.app import build_app
from training.bundle import load_bundle, save_bundle, verify_samples
from training.config import ServeConfig, load_config
from training.data import SPLIT, split_dataset
from training.evalagg import Grid, group_metrics
from training.evalmetrics import compute_metrics, roc_auc
from training.evaluate import aggregate, evaluate_encoded, evaluate_raw, group_sums, passes, score_dataset, slice_features
from training.features import GROUP, LABEL, ORACLE
from training.loop import predict
from training.models import build_model, model_arch
from training.prepare import ensure_prepared
from training.reader import Collate, encoded_datasets
from training.scoring import fields_of, score_rows
from tests.helpers import SMALL_FEATURES, small_table

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("parity")
    pq.write_table(small_table(3000, seed=4), d / "rows.parquet")
    cfg = load_config(raw={"run": {"name": "parity", "dir": str(d / "runs")}, "data": {"source": str(d / "rows.parquet")},
                           "features": SMALL_FEATURES, "model": {"name": "dcnv2", "embedding_dim": 8, "mlp": [16]}})
    prep = ensure_prepared(cfg)
    pp = prep["preprocessor"]
    torch.manual_seed(3)  # an untrained model: parity is what is tested, and its scores are spread out
    model = build_model(cfg.model, fields_of(pp), len(pp.num_columns)).eval()
    arch = model_arch(cfg.model, fields_of(pp), len(pp.num_columns))
    table = pa.concat_tables(ray.get(split_dataset(cfg)[0].to_arrow_refs()))
    test_rows = table.filter(pc.equal(table[SPLIT], 2)).drop_columns([SPLIT]).to_pylist()
    bundle = str(d / "bundle")
    save_bundle(bundle, cfg, pp, model, arch, {"note": "untrained"}, test_rows[:25])
    return {"cfg": cfg, "prep": prep, "pp": pp, "model": model, "arch": arch, "bundle": bundle, "rows": test_rows[:25],
            "n_test": prep["profile"]["rows_by_split"]["test"]}


def _gather(scored: ray.data.Dataset) -> dict[str, np.ndarray]:
    """The scored rows on the driver: what evaluation no longer does, for the tests to compare with."""
    t = pa.concat_tables(ray.get(scored.to_arrow_refs()))
    return {c: t.column(c).to_numpy() for c in t.column_names}


def _same_multiset(a: np.ndarray, b: np.ndarray) -> None:
    assert len(a) == len(b)
    np.testing.assert_allclose(np.sort(a), np.sort(b), rtol=0, atol=1e-6)


def test_training_evaluate_bundle_and_serving_give_the_same_scores(run, serve_url):
    cfg, pp, model, arch = run["cfg"], run["pp"], run["model"], run["arch"]
    # training: the loop's own validation scoring, over the encoded test rows
    shard = encoded_datasets(run["prep"]["encoded"], cfg, splits=("test",))["test"]
    loop_p = predict(model, shard, Collate(pp, [LABEL, GROUP, ORACLE], pin=False), 256, nullcontext)["p"]
    # training's one pass over test (the driver, from the encoded split), counted
    before = passes["test"]
    enc = evaluate_encoded(cfg, pp, model, arch, run["prep"]["encoded"])
    assert passes["test"] == before + 1 and enc["rows"] == run["n_test"]
    enc_p = score_dataset(encoded_datasets(run["prep"]["encoded"], cfg, splits=("test",))["test"], pp, model, arch,
                          "test", raw=False, slices=[], batch_size=1000)
    assert passes["test"] == before + 2
    enc_p = _gather(enc_p)["p"]
    # `rankray evaluate --data`: raw rows, split again, through the bundle's own preprocessor
    b_pp, b_model, meta = load_bundle(run["bundle"])
    raw = evaluate_raw(cfg, b_pp, b_model, meta["arch"])
    raw_p = score_dataset(split_dataset(cfg)[0], b_pp, b_model, meta["arch"], "test", raw=True, slices=[],
                          batch_size=700)
    raw_p = _gather(raw_p)["p"]
    assert len(loop_p) == run["n_test"] > 100
    _same_multiset(loop_p, enc_p)
    _same_multiset(loop_p, raw_p)
    assert raw["metrics"]["auc"] == pytest.approx(enc["metrics"]["auc"], abs=1e-9)
    # the bundle: recorded sample scores (raw rows of the test split), its self-check, and those rows
    # found among the training path's scores
    recorded = np.asarray(meta["samples"]["scores"])
    assert verify_samples(b_pp, b_model, meta, atol=1e-6) <= 1e-6
    np.testing.assert_allclose(score_rows(pp, model, run["rows"]), recorded, rtol=0, atol=1e-7)
    assert all(np.min(np.abs(loop_p - s)) < 1e-6 for s in recorded)
    # serving: the same rows over HTTP
    serve.run(build_app(run["bundle"], ServeConfig(), num_cpus=0.5), name="parity", route_prefix="/parity")
    try:
        rows = [{c: r[c] for c in pp.input_columns} for r in run["rows"]]
        r = httpx.post(f"{serve_url}/parity/predict", json={"rows": rows}, timeout=60)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["scores"], recorded, rtol=0, atol=1e-6)
    finally:
        serve.delete("parity")


def test_evaluation_metrics_equal_the_exact_ones_over_the_gathered_rows(run):
    cfg, pp, model, arch = run["cfg"], run["pp"], run["model"], run["arch"]
    ev = evaluate_encoded(cfg, pp, model, arch, run["prep"]["encoded"])
    names = slice_features(pp)
    rows = _gather(score_dataset(encoded_datasets(run["prep"]["encoded"], cfg, splits=("test",))["test"], pp, model,
                                 arch, "test", raw=False, slices=names, batch_size=64))
    exact = compute_metrics(rows["y"], np.clip(rows["p"], 0, 1), group=rows["g"])
    got = ev["metrics"]
    assert got["auc"] == pytest.approx(exact["auc"], abs=1e-5) and got["auc_error_bound"] < 1e-4
    assert {k: got[k] for k in exact if k != "auc"} == pytest.approx({k: v for k, v in exact.items() if k != "auc"},
                                                                    rel=1e-9, abs=1e-12)
    assert names and ev["slices"].keys() == set(names)
    for name in names:
        codes = rows[f"slice:{name}"]
        assert [r["rows"] for r in ev["slices"][name]] == sorted(np.bincount(codes)[np.bincount(codes) > 0])[::-1][:8]
        top = ev["slices"][name][0]
        m = codes == np.bincount(codes).argmax()
        assert top["rows"] == m.sum() and top["auc"] == pytest.approx(roc_auc(rows["y"][m], rows["p"][m]), abs=2e-3)


def test_what_reaches_the_driver_is_bounded_by_the_grid_not_the_rows():
    """200k scored rows in 4 blocks with a 4096-bin grid: the driver gets at most 4 x (2 x 4096 + slice and
    calibration bins) partial rows, and one row per group."""
    n, blocks, grid = 200_000, 4, Grid(bins=2**12, slice_bins=2**6)

    def rows(b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(int(b["id"][0]))
        z = rng.normal(-2.0, 1.5, len(b["id"]))
        o = 1 / (1 + np.exp(-z))
        return {"p": (1 / (1 + np.exp(-(z + rng.normal(0, 1, z.size))))).astype(np.float32),
                "y": (rng.random(z.size) < o).astype(np.float32), "g": b["id"] // 100, "o": o.astype(np.float32),
                "slice:s": (b["id"] % 5).astype(np.int32)}

    scored = ray.data.range(n, override_num_blocks=blocks).map_batches(rows, batch_size=None).materialize()
    agg = aggregate(scored, ["s"], grid)
    assert agg.rows == n and agg.received <= blocks * (2 * grid.bins + 5 * grid.slice_bins + 10) < n / 5
    data = _gather(scored)
    exact = compute_metrics(data["y"], data["p"], group=data["g"], p_true=data["o"])
    got = agg.metrics(oracle=True, groups=group_metrics(group_sums(scored)))
    assert abs(got["auc"] - exact["auc"]) <= got["auc_error_bound"] < 1e-3
    assert got["gauc"] == pytest.approx(exact["gauc"], abs=1e-9) and got["ndcg@10"] == pytest.approx(
        exact["ndcg@10"], abs=1e-9)
