"""`model.name: lightgbm` (issue 18, item 2): fitted on the encoded splits as a Ray task with early stopping
on valid AUC, scored on test once by the driver, bundled as LightGBM's text model inside safetensors (no
pickle anywhere), and served through the same scoring path with the same self-check: the served score
equals the offline score."""
from __future__ import annotations

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors import safe_open

from tests.helpers import SMALL_FEATURES, served, small_table
from training.bundle import load_bundle, verify_samples
from training.config import ConfigError, load_config
from training.evaluate import evaluate_raw
from training.models import GBDT
from training.scoring import score_rows
from training.trainer import train
from tune.space import parse_space

pytestmark = pytest.mark.usefixtures("ray_local")


def _cfg(tmp_path, **model):
    pq.write_table(small_table(4000, seed=7), tmp_path / "rows.parquet")
    return load_config(raw={"run": {"name": "gbdt", "dir": str(tmp_path / "runs")},
                            "data": {"source": str(tmp_path / "rows.parquet")}, "features": SMALL_FEATURES,
                            "model": {"name": "lightgbm", "num_leaves": 15, "min_data_in_leaf": 20, **model},
                            "train": {"cpus_per_worker": 1}})


def test_lightgbm_bundle_round_trip_served_equals_offline_and_no_pickle(tmp_path, serve_url):
    cfg = _cfg(tmp_path)
    res = train(cfg)
    m = res.metrics
    assert m["test_passes"] == 1 and m["test_auc"] > 0.7, m  # the label follows user x item and price
    assert 1 <= m["best_iteration"] <= m["rounds_run"] <= cfg.model.num_boost_round
    assert m["best_valid_auc"] > 0.7

    b_pp, model, meta = load_bundle(res.bundle)
    assert isinstance(model, GBDT) and meta["arch"]["name"] == "lightgbm"
    assert verify_samples(b_pp, model, meta, atol=1e-6) <= 1e-6
    raw = evaluate_raw(cfg, b_pp, model, meta["arch"])  # `rankray evaluate --data`: raw rows, the bundle's transform
    assert raw["metrics"]["auc"] == pytest.approx(m["test_auc"], abs=1e-6)
    # the weights are LightGBM's own text format in a safetensors file; nothing in the bundle is a pickle
    with safe_open(f"{res.bundle}/weights.safetensors", framework="np") as f:
        assert list(f.keys()) == ["model_text"]
        text = f.get_tensor("model_text").tobytes().decode()
    assert text.startswith("tree\n") and f"Tree={m['best_iteration'] - 1}\n" in text
    for p in sorted(__import__("pathlib").Path(res.bundle).iterdir()):
        head = p.read_bytes()[:2]
        assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), p.name  # pickle

    rows = [{"user": 3, "item": 3, "price": 20.0, "tags": "a|b", "color": "red"},
            {"user": 4, "item": 8, "price": 2.0, "tags": None, "color": None},
            {"user": 999, "item": 9999, "price": 1e6, "tags": "zz", "color": "mauve"}]
    offline = score_rows(b_pp, model, rows)
    with served(res.bundle, "gbdt"):
        r = httpx.post(f"{serve_url}/gbdt/predict", json={"rows": rows}, timeout=60)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["scores"], offline, rtol=0, atol=1e-6)
        r = httpx.post(f"{serve_url}/gbdt/predict", json={"rows": meta["samples"]["rows"]}, timeout=60)
        np.testing.assert_allclose(r.json()["scores"], meta["samples"]["scores"], rtol=0, atol=1e-6)


def test_search_refuses_lightgbm_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="model.name: lightgbm"):
        parse_space(_cfg(tmp_path))
    deep = load_config(raw={**_cfg(tmp_path).model_dump(mode="json"), "model": {"name": "dcnv2"},
                            "tune": {"search_space": {"model.name": {"choice": ["dcnv2", "lightgbm"]}}}})
    with pytest.raises(ConfigError, match="model.name: lightgbm"):
        parse_space(deep)
