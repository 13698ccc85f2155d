"""`model.name: lightgbm` (issue 18, items 2-4): fitted on the encoded splits as a Ray task with early stopping
on valid AUC, scored on test once by the driver, bundled as LightGBM's text model inside safetensors (no
pickle anywhere), and served through the same scoring path with the same self-check: the served score
equals the offline score. `rankray tune` searches it beside the deep models (a conditional space), and the
winner can be an ensemble of trials of both (greedy selection on valid), served as one model."""
from __future__ import annotations

import re
from pathlib import Path

import httpx
import lightgbm
import numpy as np
import optuna
import pyarrow.parquet as pq
import pytest
from safetensors import safe_open

from tests.helpers import SMALL_FEATURES, served, small_table
from training.bundle import load_bundle, verify_samples
from training.config import ConfigError, load_config
from training.evaluate import evaluate_raw
from training.gbdt import params_of
from training.models import GBDT, Blend, model_label
from training.prepare import ensure_prepared
from training.reader import read_split
from training.scoring import forward, score_rows
from training.trainer import train
from tune.search import MIN_BLEND_GAIN, blend_wins, logit_auc, run_search, select_ensemble
from tune.space import DEFAULT_SPACE, GBDT_KEYS, parse_space, start_points, trial_config

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
    _pickle_free(res.bundle)

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


def _pickle_free(bundle: str) -> None:
    for p in sorted(Path(bundle).iterdir()):
        head = p.read_bytes()[:2]
        assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), p.name  # pickle


def test_default_space_is_conditional_on_the_model_family(tmp_path):
    cfg = load_config(raw={**_cfg(tmp_path).model_dump(mode="json"), "model": {"name": "dcnv2"}})
    space = parse_space(cfg)  # the default space: both families
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        space(trial)
        keys, name = set(trial.params), trial.params["model.name"]
        seen.add(name)
        if name == "lightgbm":
            assert keys == {"model.name", *GBDT_KEYS} & set(DEFAULT_SPACE), keys
        elif name == "logreg":  # no model.* knob: its learning rate and weight decay
            assert keys == {"model.name", "train.lr", "train.weight_decay"}, keys
        else:
            assert {"model.numeric_embedding", "model.cross_layers", "train.lr"} <= keys and not keys & GBDT_KEYS, keys
        study.tell(trial, 0.5)
    assert seen == {"dcnv2", "lightgbm", "logreg"}
    # the default search starts from each model's defaults
    assert [p["model.name"] for p in start_points(cfg)] == ["lightgbm", "dcnv2", "logreg"]


def test_a_key_no_trial_uses_fails_before_any_work(tmp_path):
    base = _cfg(tmp_path).model_dump(mode="json")
    cases = [("dcnv2", {"model.num_leaves": {"int": [7, 63]}}, "model.num_leaves: model.num_leaves is a lightgbm"),
             ("lightgbm", {"train.lr": {"loguniform": [0.001, 0.01]}}, "train.lr: train.lr is a deep-model parameter"),
             ("dcnv2", {"model.name": {"uniform": [0, 1]}}, "model.name: the model is searched as {choice"),
             ("deepfm", {"model.numeric_embedding": {"choice": ["none", "periodic"]}},
              "model.numeric_embedding: model.numeric_embedding is a dcnv2 parameter")]
    for name, space, msg in cases:
        with pytest.raises(ConfigError, match=re.escape(f"tune.search_space.{msg}")):
            parse_space(load_config(raw={**base, "model": {"name": name}, "tune": {"search_space": space}}))
    both = {"model.name": {"choice": ["dcnv2", "lightgbm"]}, "train.lr": {"loguniform": [0.001, 0.01]},
            "model.num_leaves": {"int": [7, 63]}}
    bad = [{"model.name": "lightgbm", "model.num_leaves": 15, "train.lr": 0.003}]
    with pytest.raises(ConfigError, match=re.escape("tune.start_points.0: a start point") + ".*not used: \\['train.lr'\\]"):
        parse_space(load_config(raw={**base, "tune": {"search_space": both, "start_points": bad}}))


def test_search_spans_lightgbm_and_deep_and_exports_a_served_blend(tmp_path, serve_url):
    base = _cfg(tmp_path).model_dump(mode="json")
    space = {"model.name": {"choice": ["dcnv2", "lightgbm"]}, "train.lr": {"loguniform": [0.01, 0.03]},
             "model.num_leaves": {"choice": [7, 15]}}
    cfg = load_config(raw={**base, "model": {"name": "dcnv2", "embedding_dim": 8, "mlp": [32], "cross_layers": 1},
                           "train": {**base["train"], "epochs": 8, "evals_per_epoch": 1, "data_cpus": 0.5},
                           "tune": {"num_samples": 3, "search_space": space, "blend": "always",
                                    "start_points": [{"model.name": "lightgbm", "model.num_leaves": 15},
                                                     {"model.name": "dcnv2", "train.lr": 0.02}],
                                    "export_path": str(tmp_path / "winner")}})
    res = run_search(cfg)
    by_name = {n: [r for r in res.table if r["model.name"] == n] for n in ("lightgbm", "dcnv2")}
    assert by_name["lightgbm"] and by_name["dcnv2"] and len(res.table) == 3, res.table
    for r in by_name["lightgbm"]:  # a family's rows hold its own keys only; a booster runs trees, not epochs
        assert r["train.lr"] is None and r["trees"] >= 1 and r["epochs_run"] is None and not r["error"], r
    for r in by_name["dcnv2"]:
        assert r["model.num_leaves"] is None and r["trees"] is None and r["epochs_run"] >= 1 and not r["error"], r

    pp, model, meta = load_bundle(res.bundle)
    # greedy selection on valid from the best trial of each family (`always`): both families are parts
    blend = meta["info"]["blend"]
    assert isinstance(model, Blend) and {"lightgbm", "dcnv2"} <= {p["name"] for p in meta["arch"]["parts"]}
    assert blend["chosen"] and len(blend["trials"]) == 3
    assert blend["trial_valid_aucs"] == sorted(r["best_valid_auc"] for r in res.table)[::-1]
    used = [w for w in blend["weights"] if w > 0]
    assert meta["arch"]["weights"] == pytest.approx(used) and sum(used) == pytest.approx(1) and len(used) >= 2
    assert blend["valid_auc"] > 0.7 and res.winner["best_valid_auc"] == blend["valid_auc"]
    # tune.refit (default): the LightGBM part is refit on train + valid with the trees its trial chose; the
    # same booster fitted here by hand on those rows gives the bundle's scores
    (refit,) = meta["info"]["refit"]
    enc = ensure_prepared(cfg)["encoded"]
    (*tr, y_tr), (*va, y_va) = (read_split(enc, s, cfg, pp) for s in ("train", "valid"))
    trees = {r["trial"]: r["trees"] for r in by_name["lightgbm"]}[refit["trial_id"]]
    assert refit["rows"] == len(y_tr) + len(y_va) and refit["rounds"] == trees
    (part,) = [m for m in model.parts if isinstance(m, GBDT)]
    tcfg = trial_config(cfg, meta["info"]["params"][refit["trial_id"]])
    both = lightgbm.Dataset(np.concatenate([GBDT.features(*x) for x in (tr, va)]), np.concatenate([y_tr, y_va]),
                            categorical_feature=list(range(len(pp.cat_columns))))
    hand = lightgbm.train(params_of(tcfg, 1), both, num_boost_round=trees)
    np.testing.assert_allclose(forward(part, *va, logits=True), hand.predict(GBDT.features(*va), raw_score=True),
                               rtol=0, atol=1e-5)
    assert res.winner["trial_id"].startswith("blend(")
    assert meta["metrics"]["test_passes"] == 1 and res.winner["test"]["test_auc"] > 0.7
    with safe_open(f"{res.bundle}/weights.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert "parts.0.model_text" in keys and "weights" in keys and any(k.startswith("parts.1.") for k in keys)
    _pickle_free(res.bundle)

    assert verify_samples(pp, model, meta, atol=1e-6) <= 1e-6
    rows = meta["samples"]["rows"]
    with served(res.bundle, "blend"):
        r = httpx.post(f"{serve_url}/blend/predict", json={"rows": rows}, timeout=60)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["scores"], score_rows(pp, model, rows), rtol=0, atol=1e-6)
        info = httpx.get(f"{serve_url}/blend/model", timeout=60).json()
        assert info["model"] == model_label(meta["arch"]) and info["model"].startswith("blend(")


def test_ensemble_selection_is_greedy_on_valid_and_chosen_by_tune_blend_and_the_gain():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 4000)
    signal = [y + rng.normal(0, s, len(y)) for s in (1.0, 1.2, 1.2)]  # three noisy views of the label
    same = [signal[0], signal[0] * 2.0]  # one trial twice (a scaled copy): nothing to gain
    w, auc = select_ensemble(y, signal)
    assert auc == pytest.approx(logit_auc(y, sum(wi * z for wi, z in zip(w, signal))), abs=1e-12)
    assert auc > logit_auc(y, signal[0]) and sum(x > 0 for x in w) >= 2 and sum(w) == pytest.approx(1)
    assert select_ensemble(y, same) == ([1.0, 0.0], pytest.approx(logit_auc(y, signal[0])))
    w, _ = select_ensemble(y, signal, start=[1, 2])  # `always` starts from given picks
    assert w[1] > 0 and w[2] > 0
    fit = {"trial_valid_aucs": [0.81, 0.80], "weights": [0.5, 0.5]}
    assert blend_wins("auto", {**fit, "valid_auc": 0.81 + MIN_BLEND_GAIN})
    assert not blend_wins("auto", {**fit, "valid_auc": 0.81 + MIN_BLEND_GAIN / 2})  # a hair better is noise
    assert blend_wins("always", {**fit, "valid_auc": 0.81}) and not blend_wins("never", {**fit, "valid_auc": 0.9})
    assert not blend_wins("always", {**fit, "weights": [1.0, 0.0], "valid_auc": 0.81})  # one part is no blend


def test_lightgbm_trial_of_a_several_worker_search_runs_beside_the_trial_driver(tmp_path):
    """A several-worker trial's driver holds no CPU in its placement group: its LightGBM fit runs as a task
    outside it, on the CPUs the search reserved for the trial's workers."""
    base = _cfg(tmp_path).model_dump(mode="json")
    cfg = load_config(raw={**base, "model": {**base["model"], "name": "dcnv2"},
                           "train": {**base["train"], "num_workers": 2, "cpus_per_worker": 0.5, "data_cpus": 0.5},
                           "tune": {"num_samples": 1, "search_space": {"model.name": {"choice": ["lightgbm"]},
                                                                       "model.num_leaves": {"choice": [15]}},
                                    "export_path": str(tmp_path / "winner")}})
    res = run_search(cfg)
    (row,) = res.table
    assert row["model.name"] == "lightgbm" and not row["error"] and row["trees"] >= 1, row
    _, model, meta = load_bundle(res.bundle)
    assert isinstance(model, GBDT) and meta["metrics"]["test_passes"] == 1 and res.winner["test"]["test_auc"] > 0.7
