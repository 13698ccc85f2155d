"""Scoreboard: rankray's models against logreg and LightGBM on one split, test metrics side by side.

    .venv/bin/python benchmarks/quality.py --config configs/movielens.yaml [--seeds 3] [--no-tune]
        [--set key=value ...] [--json out.json]
    .venv/bin/python benchmarks/quality.py --dataset flights ...   # a real dataset of benchmarks/realdata.py

Prepares the config's data once (the same preprocessor and split for everyone), then trains on the
train split and scores the test split:
- `logreg` (rankray's linear baseline) and the deep models `dcnv2`, `dlrm`, `deepfm`, `wide_deep`,
  each with the config's settings untouched but for the model name, through `rankray train`
  (Ray Train, one worker), `--seeds` seeds each (mean ± std);
- LightGBM as a user tunes it by hand, on the same encoded columns (categorical and multi-hot slots as
  native categorical features, numeric as is): a 12-point grid (num_leaves, learning rate,
  min_data_in_leaf) with early stopping on valid, the best point on valid AUC, then `--seeds` seeds;
- the tuned winner: `rankray tune` with the config's `tune` section (skip with --no-tune);
- AutoGluon-Tabular `medium_quality` on the same split and columns, given the search's wall time, in a
  venv of its own (`make autogluon`; benchmarks/autogluon_peer.py).
Prints AUC, logloss, GAUC (when the config has a group), the Bayes ratio (synthetic data with an
oracle column) and training seconds. Needs the `bench` extra (`pip install -e .[bench]`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import raycluster

raycluster.use_token_auth()  # before ray is imported
import numpy as np
import pyarrow.parquet as pq

from training.config import Config, config_with, load_config
from raycluster.rayinit import ensure_ray
from training import storage
from training.data import s3_options
from training.evalmetrics import compute_metrics
from training.features import GROUP, LABEL, ORACLE
from training.prepare import ensure_prepared
from training.trainer import train

from realdata import SOURCES, fetch  # benchmarks/, the script's own folder

ROOT = Path(__file__).resolve().parents[1]
DEEP = ["dcnv2", "dlrm", "deepfm", "wide_deep"]
KEYS = ["auc", "logloss", "gauc", "bayes_ratio"]


def read_split(cfg: Config, encoded: str, split: str, columns: list[str]) -> dict[str, np.ndarray]:
    s3 = s3_options(cfg)
    fs, _ = storage.filesystem(encoded, s3)
    files = storage.list_files(storage.join(encoded, f"split={split}"), s3)
    t = pq.read_table(files, filesystem=fs)
    return {c: t.column(c).to_numpy() for c in columns if c in t.column_names}


# LightGBM as a user tunes it by hand: this grid on valid AUC (seed 0), then the best point with every seed
LGB_GRID = [{"num_leaves": nl, "learning_rate": lr, "min_data_in_leaf": md}
            for nl in (15, 63, 255) for lr in (0.03, 0.1) for md in (20, 100)]


def encoded_splits(cfg: Config, prep: dict) -> tuple[list[str], dict[str, dict[str, np.ndarray]]]:
    """(feature columns, split -> column -> values) of the prepared split: what every peer is given."""
    pp = prep["preprocessor"]
    cols = pp.cat_columns + pp.num_columns
    return cols, {s: read_split(cfg, prep["encoded"], s, cols + [LABEL, GROUP, ORACLE]) for s in ("train", "valid", "test")}


def lightgbm_rows(cfg: Config, prep: dict, data: tuple[list[str], dict], seeds: int) -> list[dict]:
    """LightGBM tuned by hand on valid, and the same refit on train + valid (both: the best a user would do)."""
    import lightgbm as lgb

    pp = prep["preprocessor"]
    cols, splits = data

    def frame(s: str) -> np.ndarray:
        return np.stack([splits[s][c].astype(np.float32) for c in cols], axis=1)

    t0 = time.time()
    train_set = lgb.Dataset(frame("train"), splits["train"][LABEL], feature_name=cols,
                            categorical_feature=pp.cat_columns, free_raw_data=False)
    valid_set = lgb.Dataset(frame("valid"), splits["valid"][LABEL], reference=train_set)
    x_test, test = frame("test"), splits["test"]

    both_set = lgb.Dataset(np.concatenate([frame("train"), frame("valid")]),
                           np.concatenate([splits["train"][LABEL], splits["valid"][LABEL]]), feature_name=cols,
                           categorical_feature=pp.cat_columns, free_raw_data=False)

    def params(point: dict, seed: int) -> dict:
        return {"objective": "binary", "metric": "auc", "feature_fraction": 0.9, "bagging_fraction": 0.9,
                "bagging_freq": 1, "seed": seed, "num_threads": 2, "verbosity": -1, "feature_pre_filter": False,
                **point}

    def metrics(booster: Any, **kw: Any) -> dict:
        p = booster.predict(x_test, **kw)
        return compute_metrics(test[LABEL], p, test.get(GROUP) if cfg.features.group else None, test.get(ORACLE))

    def fit(point: dict, seed: int) -> tuple[float, dict, int, dict]:
        booster = lgb.train(params(point, seed), train_set, num_boost_round=5000, valid_sets=[valid_set],
                            callbacks=[lgb.early_stopping(50, verbose=False)])
        trees = booster.best_iteration
        # the same point refit on train + valid with the trees valid chose (what tune.refit does)
        refit = lgb.train(params(point, seed), both_set, num_boost_round=trees)
        return booster.best_score["valid_0"]["auc"], metrics(booster, num_iteration=trees), trees, metrics(refit)

    tried = [(fit(point, 0), point) for point in LGB_GRID]
    first, best = max(tried, key=lambda t: t[0][0])
    print(f"  LightGBM grid ({len(LGB_GRID)} points, valid AUC): best {best} {first[0]:.4f}", flush=True)
    fits = [first] + [fit(best, seed) for seed in range(1, seeds)]
    trees = round(statistics.mean(f[2] for f in fits))
    what = (f"{len(LGB_GRID)}-point grid on valid: leaves {best['num_leaves']}, lr {best['learning_rate']}, "
            f"min_data {best['min_data_in_leaf']}; {trees} trees")
    rows = [_aggregate(f"LightGBM tuned ({what})", [_pick(f[1]) for f in fits]),
            _aggregate(f"LightGBM tuned + refit (on train + valid, {trees} trees)", [_pick(f[3]) for f in fits])]
    for row in rows:
        row["seconds"] = time.time() - t0
    return rows


AUTOGLUON = ROOT / ".venv-autogluon" / "bin" / "python"


def autogluon_row(prep: dict, data: tuple[list[str], dict], seconds: float) -> dict:
    """AutoGluon-Tabular `medium_quality` on the same split and columns (categoricals as categories), in its
    own venv (`make autogluon`), given `seconds` of wall time (the tuned search's)."""
    import pyarrow as pa

    pp = prep["preprocessor"]
    cols, splits = data
    with tempfile.TemporaryDirectory(prefix="rankray-autogluon-") as where:
        for s, d in splits.items():
            table = {c: pa.array(d[c]).dictionary_encode() if c in pp.cat_columns else pa.array(d[c]) for c in cols}
            pq.write_table(pa.table({**table, "label": pa.array(d[LABEL].astype(np.int8))}), f"{where}/{s}.parquet")
        out = subprocess.run([str(AUTOGLUON), str(ROOT / "benchmarks" / "autogluon_peer.py"), where, str(seconds)],
                             capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return {"model": f"AutoGluon medium_quality ({res['models']} models, best {res['best']}; "
                     f"{seconds:.0f} s limit)", "auc": res["auc"], "seconds": res["seconds"], "n": 1}


def _pick(m: dict, prefix: str = "") -> dict:
    return {k: float(m[prefix + k]) for k in KEYS if prefix + k in m and np.isfinite(m[prefix + k])}


def rankray_rows(cfg: Config, name: str, seeds: int, ckpt: str) -> dict:
    runs = []
    for seed in range(seeds):
        c = config_with(cfg, {"model.name": name, "train.seed": seed, "train.storage_path": ckpt})
        res = train(c, run_name=f"quality-{cfg.run.name}-{name}-s{seed}", write_bundle=False)
        runs.append({**_pick(res.metrics, "test_"), "seconds": res.seconds})
        print(f"  {name} seed {seed}: test AUC {runs[-1]['auc']:.4f} in {res.seconds:.0f} s", flush=True)
    return _aggregate(name, runs)


def _aggregate(name: str, runs: list[dict]) -> dict:
    out: dict = {"model": name, "n": len(runs)}
    for k in KEYS + ["seconds"]:
        vals = [r[k] for r in runs if k in r]
        if vals:
            out[k] = statistics.mean(vals)
            out[k + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return out


def tuned_row(cfg: Config, ckpt: str) -> dict:
    from tune.search import run_search

    c = config_with(cfg, {"train.storage_path": ckpt, "tune.export_path": storage.join(ckpt, "winner")})
    res = run_search(c, restart=True)
    w = res.winner
    name = w["params"].get("blend") or w["params"].get("model.name", cfg.model.name)
    row = {"model": f"tuned winner ({name}, "
                    f"{cfg.tune.num_samples} trials)", **_pick(w["test"], "test_"), "seconds": res.seconds, "n": 1}
    row["params"] = w["params"]
    return row


def fmt(row: dict, key: str, digits: int = 4) -> str:
    if key not in row:
        return "—"
    s = f"{row[key]:.{digits}f}"
    return s + (f" ± {row[key + '_std']:.{digits}f}" if row.get("n", 1) > 1 and key + "_std" in row else "")


def table(rows: list[dict]) -> str:
    keys = [k for k in KEYS if any(k in r for r in rows)]
    out = ["| model | seeds | " + " | ".join(f"test {k}" for k in keys) + " | train s |",
           "|---|---|" + "---|" * len(keys) + "---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['n']} | " + " | ".join(fmt(r, k) for k in keys)
                   + f" | {fmt(r, 'seconds', 0)} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--config")
    where.add_argument("--dataset", choices=list(SOURCES),
                       help="a real dataset of the suite: fetched (benchmarks/realdata.py), configs/real/NAME.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=DEEP)
    ap.add_argument("--no-tune", action="store_true")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    if args.dataset:
        fetch(args.dataset)
        args.config = f"configs/real/{args.dataset}.yaml"
    cfg = load_config(args.config, args.set)
    ensure_ray(cfg, job_name=f"quality-{cfg.run.name}")
    prep = ensure_prepared(cfg)
    rows_by_split = prep["profile"]["rows_by_split"]
    print(f"{args.config}: train/valid/test rows {rows_by_split}", flush=True)
    with tempfile.TemporaryDirectory(prefix="rankray-quality-") as ckpt:
        data = encoded_splits(cfg, prep)  # what LightGBM and AutoGluon are given, read once
        rows = [rankray_rows(cfg, "logreg", 1, ckpt), *lightgbm_rows(cfg, prep, data, args.seeds)]
        print(f"  LightGBM: test AUC {rows[-2]['auc']:.4f}, refit {rows[-1]['auc']:.4f} in {rows[-1]['seconds']:.0f} s",
              flush=True)
        rows += [rankray_rows(cfg, name, args.seeds, ckpt) for name in args.models]
        if not args.no_tune:
            rows.append(tuned_row(cfg, ckpt))
            if AUTOGLUON.exists():
                rows.append(autogluon_row(prep, data, rows[-1]["seconds"]))
                print(f"  AutoGluon: test AUC {rows[-1]['auc']:.4f} in {rows[-1]['seconds']:.0f} s", flush=True)
            else:
                print(f"  AutoGluon: not run ({AUTOGLUON.relative_to(ROOT)} missing: `make autogluon`)", flush=True)
    print(table(rows))
    for r in rows:
        if "params" in r:
            print(f"tuned winner params: {json.dumps(r['params'])}")
    by = {r["model"].split(" (")[0]: r for r in rows}
    tuned = next((r for r in rows if "params" in r), None)
    what = f"test AUC, {cfg.run.name} ({sum(rows_by_split.values()):,} rows): default dcnv2" \
        + (" / tuned winner" if tuned else "") + " vs LightGBM vs logreg"
    if "dcnv2" in by:
        fig = fmt(by["dcnv2"], "auc") + (f" / {fmt(tuned, 'auc')}" if tuned else "") \
            + f" vs {fmt(by['LightGBM tuned'], 'auc')} vs {fmt(by['logreg'], 'auc')}"
        if "bayes_ratio" in by["dcnv2"]:
            fig += f" (Bayes ratio {fmt(by['dcnv2'], 'bayes_ratio', 3)} vs LightGBM {fmt(by['LightGBM tuned'], 'bayes_ratio', 3)})"
        print(f"HEADLINE | {what} | {fig}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "overrides": args.set, "rows": rows, "split_rows": rows_by_split}, f,
                      indent=1)


if __name__ == "__main__":
    main()
