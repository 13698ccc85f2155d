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
from training.evaluate import evaluate_encoded, evaluate_raw, passes, score_dataset
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
                          "test", raw=False, slices=[], batch_size=1000)["p"]
    # `rankray evaluate --data`: raw rows, split again, through the bundle's own preprocessor
    b_pp, b_model, meta = load_bundle(run["bundle"])
    raw = evaluate_raw(cfg, b_pp, b_model, meta["arch"])
    raw_p = score_dataset(split_dataset(cfg)[0], b_pp, b_model, meta["arch"], "test", raw=True, slices=[],
                          batch_size=700)["p"]
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
