"""AutoGluon-Tabular as the quality suite's AutoML peer, run by benchmarks/quality.py in a venv of its own
(AutoGluon pins its own Ray): `make autogluon` creates it (.venv-autogluon; AutoGluon with its LightGBM,
CatBoost and XGBoost models; no PyTorch, so its neural models are left out).

    .venv-autogluon/bin/python benchmarks/autogluon_peer.py DIR SECONDS

DIR holds train/valid/test.parquet as quality.py writes them (the rankray split's encoded columns, `label`,
categorical columns as dictionary types); valid is AutoGluon's tuning data. Prints one JSON line with the
test AUC and the seconds it took.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time

import pandas as pd
from autogluon.tabular import TabularPredictor
from sklearn.metrics import roc_auc_score


def main() -> None:
    where, seconds = sys.argv[1], float(sys.argv[2])
    train, valid, test = (pd.read_parquet(f"{where}/{s}.parquet") for s in ("train", "valid", "test"))
    t0 = time.time()
    with tempfile.TemporaryDirectory() as out:
        predictor = TabularPredictor(label="label", eval_metric="roc_auc", path=out, verbosity=0).fit(
            train, tuning_data=valid, presets="medium_quality", time_limit=seconds, num_cpus=2, num_gpus=0)
        p = predictor.predict_proba(test.drop(columns=["label"]))[1]
        print(json.dumps({"auc": float(roc_auc_score(test["label"], p)), "seconds": time.time() - t0,
                          "models": len(predictor.model_names()), "best": predictor.model_best}), flush=True)


if __name__ == "__main__":
    main()
