"""Real logs as they come (issue 18, item 1): multi-hot as Parquet list<string> / large_list<int64> (nulls
inside and as the whole value), a timestamp time column, a nullable int id, a dictionary-encoded column and
a Hive-style `key=value/` partition directory read as a column. One run goes prepare -> train -> bundle ->
served score over HTTP == offline score; types that cannot work are refused before any data work, naming
the column (or both files) and the type."""
from __future__ import annotations

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import run_schemathesis, served
from training.bundle import load_bundle, verify_samples
from training.config import load_config
from training.evaluate import evaluate_raw
from training.features import DataError
from training.prepare import ensure_prepared
from training.scoring import score_rows
from training.trainer import train

pytestmark = pytest.mark.usefixtures("ray_local")

FEATURES = {
    "label": "clicked", "group": "user", "time": "ts",
    "features": [
        {"name": "user", "type": "categorical"},
        {"name": "item", "type": "categorical"},
        {"name": "region", "type": "categorical"},
        {"name": "tags", "type": "multi_hot", "max_len": 3},
        {"name": "cats", "type": "multi_hot", "max_len": 2},
        {"name": "price", "type": "numeric", "transform": "log1p"},
        {"name": "user_seen", "type": "numeric", "count_by": "user"},
    ],
}


def _logs(n: int, seed: int) -> dict[str, pa.Table]:
    """Rows by region (the partition key, not stored in the files), with every awkward type."""
    rng = np.random.default_rng(seed)
    user = rng.integers(0, 50, n)
    item = rng.integers(0, 30, n)
    tag_pool = [["a", "b"], ["b"], [], None, ["c", None, "a"], ["d", "e", "f", "g"]]
    tags = [tag_pool[i] for i in rng.integers(0, len(tag_pool), n)]
    cats = [None if i == 0 else list(range(i)) for i in rng.integers(0, 4, n)]
    price = rng.lognormal(3, 1, n)
    logit = np.where(user % 3 == item % 3, 1.5, -1.5) + np.array([2.0 if t and "a" in t else -1.0 for t in tags])
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    region = rng.integers(0, 2, n)
    table = pa.table({
        "user": pa.array(np.where(np.arange(n) % 37 == 0, None, user).tolist(), pa.int64()),  # nullable int
        "item": pa.array([f"i{x}" for x in item]).dictionary_encode(),  # dictionary-encoded strings
        "tags": pa.array(tags, pa.list_(pa.string())),
        "cats": pa.array(cats, pa.large_list(pa.int64())),
        "price": price,
        "ts": pa.array((1_700_000_000_000 + np.arange(n) * 60_000).tolist(), pa.timestamp("ms")),
        "clicked": label,
    })
    return {name: table.filter(pa.array(region == i)) for i, name in enumerate(("eu", "us"))}


def _write_hive(base, parts: dict[str, pa.Table]) -> str:
    for region, t in parts.items():
        d = base / f"region={region}"
        d.mkdir(parents=True)
        half = t.num_rows // 2
        pq.write_table(t.slice(0, half), d / "part-0.parquet")
        pq.write_table(t.slice(half), d / "part-1.parquet")
    return str(base)


def test_awkward_types_train_bundle_and_serve_the_offline_scores(tmp_path, serve_url):
    src = _write_hive(tmp_path / "logs", _logs(4000, seed=5))
    cfg = load_config(raw={
        "run": {"name": "ingest", "dir": str(tmp_path / "runs")},
        "data": {"source": src, "split": {"kind": "time"}},
        "features": FEATURES, "model": {"name": "dcnv2", "embedding_dim": 8, "mlp": [32]},
        "train": {"num_workers": 1, "cpus_per_worker": 1, "epochs": 3, "batch_size": 256, "evals_per_epoch": 1,
                  "storage_path": str(tmp_path / "ckpt")}})
    prep = ensure_prepared(cfg)
    pp = prep["preprocessor"]
    assert prep["profile"]["rows"] == 4000
    assert sorted(pp.vocab["region"].to_pylist()) == ["eu", "us"]  # the partition key became a column
    assert set(pp.vocab["tags"].to_pylist()) == set("abcdefg")  # list items, nulls inside left out
    assert pa.types.is_integer(pp.vocab["cats"].type) and pa.types.is_integer(pp.vocab["user"].type)

    res = train(cfg)
    assert res.metrics["test_auc"] > 0.6, res.metrics["test_auc"]
    b_pp, model, meta = load_bundle(res.bundle)
    rows = meta["samples"]["rows"]
    assert any(r["tags"] is None for r in rows) or any(isinstance(r["tags"], list) for r in rows)
    assert verify_samples(b_pp, model, meta, atol=1e-6) <= 1e-6
    # `rankray evaluate --data`: the raw rows again, through the bundle's own transform
    raw = evaluate_raw(cfg, b_pp, model, meta["arch"])
    assert raw["metrics"]["auc"] == pytest.approx(res.metrics["test_auc"], abs=1e-6)

    # served: JSON arrays (and null) for the list columns, an int id (and null), the partition value
    reqs = [
        {"user": 3, "item": "i3", "region": "eu", "tags": ["a", "b"], "cats": [0, 1], "price": 20.0, "user_seen": 4},
        {"user": None, "item": "i9", "region": "us", "tags": None, "cats": None, "price": 5.0, "user_seen": 0},
        {"user": 7, "item": "new", "region": "mars", "tags": ["zz", "a"], "cats": [], "price": 1.0, "user_seen": 1},
    ]
    offline = score_rows(b_pp, model, reqs)
    with served(res.bundle, "ingest"):
        r = httpx.post(f"{serve_url}/ingest/predict", json={"rows": reqs}, timeout=60)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["scores"], offline, rtol=0, atol=1e-6)
        r = httpx.post(f"{serve_url}/ingest/predict", json={"rows": rows}, timeout=60)
        assert r.status_code == 200, r.text
        # the schema of list columns, int ids and the rest is what validation takes (schemathesis, all checks)
        run_schemathesis(f"{serve_url}/ingest")
        np.testing.assert_allclose(r.json()["scores"], meta["samples"]["scores"], rtol=0, atol=1e-6)
        bad = httpx.post(f"{serve_url}/ingest/predict", json={"rows": [{**reqs[0], "tags": [{"x": 1}]}]}, timeout=60)
        assert bad.status_code == 422 and "tags" in bad.text, bad.text


def test_given_splits_with_int_ids_in_one_file_and_strings_in_another_name_both(tmp_path):
    parts = _logs(600, seed=1)["eu"]
    paths = {}
    for split, t in (("train", parts.slice(0, 200)), ("valid", parts.slice(200, 50)), ("test", parts.slice(250))):
        if split == "valid":
            t = t.set_column(t.schema.get_field_index("user"), "user", pa.array([str(x) for x in t["user"].to_pylist()]))
        (tmp_path / split).mkdir()
        pq.write_table(t, tmp_path / split / "part.parquet")
        paths[split] = str(tmp_path / split)
    feats = {**FEATURES, "features": [f for f in FEATURES["features"] if f["name"] != "region"]}  # no partitions
    cfg = load_config(raw={"run": {"name": "mixed", "dir": str(tmp_path / "runs")},
                           "data": {**paths, "split": {"kind": "given"}}, "features": feats})
    with pytest.raises(DataError) as e:
        ensure_prepared(cfg)
    msg = str(e.value)
    assert "'user'" in msg and "train/part.parquet" in msg and "valid/part.parquet" in msg, msg
    assert "int64" in msg and "string" in msg, msg


@pytest.mark.parametrize("column,feature,named", [
    ("price", {"name": "price", "type": "multi_hot"}, "multi_hot feature 'price' (column 'price') has type double"),
    ("tags", {"name": "tags", "type": "categorical"}, "categorical feature 'tags' (column 'tags') has nested type"),
    ("tags", {"name": "tags", "type": "numeric"}, "numeric feature 'tags' (column 'tags') has type list<"),
])
def test_a_type_that_cannot_work_is_refused_before_any_data_work(tmp_path, column, feature, named):
    src = _write_hive(tmp_path / "logs", _logs(300, seed=2))
    feats = {**FEATURES, "features": [f for f in FEATURES["features"] if f["name"] != feature["name"]] + [feature]}
    cfg = load_config(raw={"run": {"name": "bad", "dir": str(tmp_path / "runs")}, "data": {"source": src},
                           "features": feats})
    with pytest.raises(DataError, match=named.replace("(", r"\(").replace(")", r"\)")):
        ensure_prepared(cfg)
    assert not (tmp_path / "runs" / "bad" / "data" / "encoded").exists()
