"""Score a split with a model (Ray Data batch inference through `training.scoring`), compute exact
metrics and write a self-contained HTML report.

Training scores its test split once, from the encoded split (`evaluate_encoded`); `rankray evaluate
--data` scores raw rows through the bundle's own transform (`evaluate_raw`). Both run `score_batch`."""
from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
import torch
from safetensors.torch import load as load_weights
from safetensors.torch import save as save_weights

from training import storage
from training.config import CategoricalFeature, Config
from training.data import SPLIT, SPLIT_NAMES, s3_options, split_dataset, usable_rows
from training.evalmetrics import compute_metrics, roc_auc
from training.features import FIRST, GROUP, LABEL, ORACLE, Preprocessor
from training.models import model_from_arch
from training.reader import encoded_datasets
from training.report import evaluation_report
from training.cache import cached, content_key
from training.scoring import forward, score_columns, unwrap

MAX_SLICE_CARDINALITY = 50
UNSEEN = "(unseen or null)"
# passes over each split scored in this process (training scores test once per run: its metrics say so)
passes: Counter[str] = Counter()


def slice_features(pp: Preprocessor) -> list[str]:
    """Low-cardinality categorical features get per-value AUC in the report."""
    return [f.name for f in pp.spec.features if isinstance(f, CategoricalFeature) and not f.hash_buckets
            and len(pp.vocab.get(f.name, [])) <= MAX_SLICE_CARDINALITY]


def score_batch(t: pa.Table, key: str, payload: tuple[str, dict, bytes], raw: bool, split: int | None,
                slices: list[str]) -> dict[str, np.ndarray]:
    """Ray Data UDF: one split's rows -> p, y, g, o and the slice features' encoded ids. Raw rows (with the
    split column) go through the preprocessor's transform first; encoded rows are packed as they are.
    `payload` = (preprocessor JSON, arch, safetensors weights), built once per worker process (`key`)."""
    pp, model = cached(key, lambda: _load(*payload))
    if split is not None:
        t = t.filter(pc.equal(t[SPLIT], split))
    if raw and t.num_rows:
        p, enc = score_columns(pp, model, {c: t.column(c) for c in t.column_names})
    else:  # encoded rows, or none left of this split
        enc = {c: t.column(c).to_numpy() for c in t.column_names}
        p = forward(model, *pp.pack(enc)) if t.num_rows else np.zeros(0, np.float32)
    n = len(p)
    out = {"p": p, "y": np.asarray(enc.get(LABEL, np.full(n, np.nan)), np.float32),
           "g": np.asarray(enc.get(GROUP, np.zeros(n, np.int64)), np.int64),
           "o": np.asarray(enc.get(ORACLE, np.full(n, np.nan)), np.float32)}
    for name in slices:
        out[f"slice:{name}"] = np.asarray(enc[name], np.int32) if n else np.zeros(0, np.int32)
    return out


def _load(pp_json: str, arch: dict, weights: bytes) -> tuple[Preprocessor, torch.nn.Module]:
    model = model_from_arch(arch)
    model.load_state_dict(load_weights(weights))
    return Preprocessor.from_json(pp_json), model


def score_dataset(ds: ray.data.Dataset, pp: Preprocessor, model: torch.nn.Module, arch: dict, split: str, *,
                  raw: bool, slices: list[str], batch_size: int) -> dict[str, np.ndarray]:
    """Scores of every row of `split` in `ds` (raw rows of all splits, or the encoded split itself); a few
    numbers per row come back to the driver."""
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    pp_json, weights = pp.to_json(), save_weights(state)
    scored = ds.map_batches(score_batch, batch_format="pyarrow", batch_size=batch_size,
                            fn_args=(content_key(pp_json, json.dumps(arch, sort_keys=True), weights),
                                     (pp_json, arch, weights), raw, SPLIT_NAMES.index(split) if raw else None, slices))
    tables = [b for b in ray.get(scored.to_arrow_refs()) if b.num_rows]
    if not tables:
        raise ValueError(f"the {split} split has no rows to score")
    passes[split] += 1
    table = pa.concat_tables(tables)
    return {c: table.column(c).to_numpy() for c in table.column_names}


def _slice_label(pp: Preprocessor, name: str, code: int) -> str:
    return str(pp.vocab[name][code - FIRST].as_py()) if code >= FIRST else UNSEEN


def slice_aucs(pred: dict[str, np.ndarray], pp: Preprocessor, names: list[str], top: int = 8) -> dict[str, list[dict]]:
    out = {}
    for name in names:
        codes = pred[f"slice:{name}"]
        uniq, counts = np.unique(codes, return_counts=True)
        rows = []
        for i in np.argsort(-counts, kind="stable")[:top]:
            m = codes == uniq[i]
            y, p = pred["y"][m], pred["p"][m]
            rows.append({"value": _slice_label(pp, name, int(uniq[i])), "rows": int(m.sum()),
                         "label_rate": float(y.mean()),
                         "auc": float(roc_auc(y, p)) if 0 < y.sum() < len(y) else float("nan")})
        out[name] = rows
    return out


def evaluate_encoded(cfg: Config, pp: Preprocessor, model: torch.nn.Module, arch: dict, encoded_dir: str,
                     split: str = "test", *, history: list[dict] | None = None,
                     meta: dict | None = None) -> dict[str, Any]:
    """Metrics and report of a prepared (encoded) split: what training scores its test split with."""
    ds = encoded_datasets(encoded_dir, cfg, splits=(split,))[split]
    return _evaluate(ds, False, cfg, pp, model, arch, split, history, meta)


def evaluate_raw(cfg: Config, pp: Preprocessor, model: torch.nn.Module, arch: dict, split: str = "test", *,
                 history: list[dict] | None = None, meta: dict | None = None) -> dict[str, Any]:
    """Metrics and report of a split of the config's raw data (read, joined and split again), scored through
    the preprocessor's transform: `rankray evaluate --data`."""
    ds = usable_rows(split_dataset(cfg)[0], cfg)  # quarantined rows are not scored either
    return _evaluate(ds, True, cfg, pp, model, arch, split, history, meta)


def _evaluate(ds: ray.data.Dataset, raw: bool, cfg: Config, pp: Preprocessor, model: torch.nn.Module, arch: dict,
              split: str, history: list[dict] | None, meta: dict | None) -> dict[str, Any]:
    names = slice_features(pp)
    pred = score_dataset(ds, pp, model, arch, split, raw=raw, slices=names, batch_size=cfg.data.batch_size)
    if np.isnan(pred["y"]).any():
        raise ValueError(f"label column {cfg.features.label!r} is missing from the scored rows")
    oracle = pred["o"] if cfg.features.oracle and not np.isnan(pred["o"]).any() else None
    metrics = compute_metrics(pred["y"], np.clip(pred["p"], 0, 1), group=pred["g"] if cfg.features.group else None,
                              p_true=oracle)
    slices = slice_aucs(pred, pp, names)
    html = evaluation_report(title=f"rankray evaluation: {cfg.run.name} ({split} split)", metrics=metrics,
                             y=pred["y"], p=pred["p"], slices=slices, history=history, meta=meta)
    return {"metrics": metrics, "html": html, "slices": slices, "rows": len(pred["y"])}


def write_evaluation(out_dir: str, ev: dict[str, Any], cfg: Config) -> None:
    s3 = s3_options(cfg)
    storage.write_text(storage.join(out_dir, "report.html"), ev["html"], s3)
    storage.write_text(storage.join(out_dir, "metrics.json"),
                       json.dumps({"metrics": ev["metrics"], "slices": ev["slices"], "rows": ev["rows"]}, indent=2), s3)
