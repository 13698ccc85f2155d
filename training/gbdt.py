"""`model.name: lightgbm`: a LightGBM booster fitted on the same encoded train split the deep models read,
with early stopping on valid AUC, as one Ray task holding every CPU the run asks for (num_workers x
cpus_per_worker). The categorical slots are LightGBM's native categoricals (a multi-hot field's slots
each one), the numerics as encoded. The result is a `training.models.GBDT`, which the driver scores on
test and bundles like any other model.

`rankray tune` searches it beside the deep models (tune.space: a conditional space; a trial fits it in its
own process). The search's winner refits its LightGBM parts on train + valid (`refit_gbdt`, tune.refit).
Not yet: Ray Train's distributed LightGBM over several workers."""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import ray

from training.config import Config
from training.evalmetrics import compute_metrics
from training.features import Preprocessor
from training.models import GBDT, model_arch
from training.reader import read_split
from training.scoring import fields_of

EARLY_STOP_ROUNDS = 50


def params_of(cfg: Config, threads: int) -> dict[str, Any]:
    m = cfg.model
    return {"objective": "binary", "metric": "auc", "learning_rate": m.gbdt_learning_rate, "num_leaves": m.num_leaves,
            "min_data_in_leaf": m.min_data_in_leaf, "feature_fraction": 0.9, "bagging_fraction": 0.9,
            "bagging_freq": 1, "lambda_l2": 1.0, "cat_smooth": 10.0, "max_cat_to_onehot": 8,
            "num_threads": threads, "seed": cfg.train.seed, "verbosity": -1, "deterministic": True}


def _fit(cfg_json: dict, pp_json: str, encoded: str, threads: int, rounds: int | None = None) -> dict[str, Any]:
    """Early stopping on valid (rounds None), or a refit: `rounds` trees on train + valid, nothing held out."""
    import lightgbm

    cfg, pp = Config.model_validate(cfg_json), Preprocessor.from_json(pp_json)
    t0 = time.time()
    (*tr, y_tr), (*va, y_va) = (read_split(encoded, s, cfg, pp) for s in ("train", "valid"))
    x_tr, x_va = GBDT.features(*tr), GBDT.features(*va)
    cats = list(range(len(pp.cat_columns)))
    if rounds is not None:
        both = lightgbm.Dataset(np.concatenate([x_tr, x_va]), np.concatenate([y_tr, y_va]),
                                categorical_feature=cats, free_raw_data=True)
        booster = lightgbm.train(params_of(cfg, threads), both, num_boost_round=rounds)
        return {"model_text": booster.model_to_string(), "rows": len(y_tr) + len(y_va), "rounds": rounds,
                "seconds": time.time() - t0}
    train_set = lightgbm.Dataset(x_tr, y_tr, categorical_feature=cats, free_raw_data=True)
    valid_set = lightgbm.Dataset(x_va, y_va, categorical_feature=cats, reference=train_set)
    curve: dict[str, Any] = {}
    booster = lightgbm.train(params_of(cfg, threads), train_set, num_boost_round=cfg.model.num_boost_round,
                             valid_sets=[valid_set], valid_names=["valid"],
                             callbacks=[lightgbm.early_stopping(EARLY_STOP_ROUNDS, verbose=False),
                                        lightgbm.record_evaluation(curve)])
    seconds = time.time() - t0
    best = booster.best_iteration or booster.current_iteration()
    p = 1 / (1 + np.exp(-booster.predict(x_va, num_iteration=best, raw_score=True)))
    valid = compute_metrics(y_va, p)
    aucs = curve["valid"]["auc"]
    # the curve every 10 rounds, in the deep models' history rows ("epoch" is the boosting round here)
    history = [{"epoch": i + 1, "valid_auc": float(a)} for i, a in enumerate(aucs) if (i + 1) % 10 == 0 or i + 1 == best]
    return {"model_text": booster.model_to_string(num_iteration=best), "best_valid_auc": float(valid["auc"]),
            "best_iteration": int(best), "rounds_run": len(aucs), "train_rows": len(y_tr),
            "train_seconds": seconds, "history": history, **{f"valid_{k}": v for k, v in valid.items()}}


def _run(cfg: Config, pp: Preprocessor, encoded: str, here: bool, rounds: int | None = None) -> dict[str, Any]:
    cpus = cfg.train.num_workers * cfg.train.cpus_per_worker
    args = (cfg.model_dump(mode="json"), pp.to_json(), encoded, max(1, math.ceil(cpus)), rounds)
    if here:
        return _fit(*args)
    # DEFAULT: not into the caller's placement group (a several-worker Tune trial's driver holds 0 CPU in
    # its own); the search's resource check reserved these CPUs for the trial's workers
    task = ray.remote(_fit).options(num_cpus=cpus, resources=cfg.train.worker_resources, max_retries=max(cfg.train.max_failures, 0),
                                    scheduling_strategy="DEFAULT")
    return ray.get(task.remote(*args))


def refit_gbdt(cfg: Config, pp: Preprocessor, encoded: str, model: GBDT) -> dict[str, Any]:
    """Refit `model` in place on train + valid with as many trees as it has (the count early stopping chose
    on valid), its trial's settings (`cfg`): the rows valid held out become training rows too. As a Ray task
    with the trial's CPUs. Returns {rows, rounds, seconds}."""
    out = _run(cfg, pp, encoded, here=False, rounds=model.trees)
    model.set_booster_text(out.pop("model_text"))
    return out


def fit_gbdt(cfg: Config, pp: Preprocessor, encoded: str, *, here: bool = False) -> tuple[GBDT, dict[str, Any], dict[str, Any]]:
    """(model, arch, metrics) of a LightGBM fit on the encoded splits: as a Ray task holding num_workers x
    cpus_per_worker CPUs, or `here` in this process (a Tune trial that already holds its CPUs)."""
    out = _run(cfg, pp, encoded, here)
    fields = fields_of(pp)
    model = GBDT(fields, len(pp.num_columns))
    model.set_booster_text(out.pop("model_text"))
    arch = model_arch(cfg.model, fields, len(pp.num_columns))
    metrics = {**out, "final": True}
    return model.eval(), arch, metrics
