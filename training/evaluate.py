"""Score a split with a model through the preprocessor's own transform (Ray Data batch inference),
compute exact metrics and write a self-contained HTML report."""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
from safetensors.torch import load as load_weights
from safetensors.torch import save as save_weights

from raycluster.config import CategoricalFeature, Config
from training import storage
from training.data import SPLIT, SPLIT_NAMES, s3_options, split_dataset, usable_rows
from training.evalmetrics import compute_metrics, roc_auc
from training.features import GROUP, LABEL, ORACLE, Preprocessor
from training.models import FieldSpec, model_arch, model_from_arch
from training.report import evaluation_report

MAX_SLICE_CARDINALITY = 50


def fields_of(pp: Preprocessor) -> list[FieldSpec]:
    """The model's categorical fields, as the preprocessor lays out their slots."""
    return [FieldSpec(f.name, pp.cardinality(f.name), len(pp.slots(f))) for f in pp.cat_features]


def slice_features(pp: Preprocessor) -> list[str]:
    """Low-cardinality categorical features get per-value AUC in the report."""
    return [f.name for f in pp.spec.features if isinstance(f, CategoricalFeature) and not f.hash_buckets
            and len(pp.vocab.get(f.name, [])) <= MAX_SLICE_CARDINALITY]


class Scorer:
    """Ray Data UDF: raw rows of one split -> label, probability, group, oracle, slice values."""

    def __init__(self, pp_json: str, arch: dict, weights: bytes, split: int, slices: list[str]) -> None:
        self.pp = Preprocessor.from_json(pp_json)
        self.model = model_from_arch(arch)
        self.model.load_state_dict(load_weights(weights))
        self.model.eval()
        self.split, self.slices = split, slices

    def __call__(self, t: pa.Table) -> dict[str, np.ndarray]:
        t = t.filter(pc.equal(t[SPLIT], self.split))
        enc = self.pp.transform({c: t.column(c) for c in t.column_names})
        cat, num = self.pp.pack(enc)
        with torch.no_grad():
            p = torch.sigmoid(self.model(torch.from_numpy(cat), torch.from_numpy(num))).numpy().astype(np.float64)
        out = {"p": p, "y": enc[LABEL], "g": enc.get(GROUP, np.zeros(len(p), np.int64)),
               "o": enc.get(ORACLE, np.full(len(p), np.nan, np.float32))}
        for name in self.slices:
            col = self.pp._feature(name).column
            out[f"slice:{name}"] = pc.cast(t.column(col), pa.string()).fill_null("(null)").to_numpy(zero_copy_only=False)
        return out


def score_split(cfg: Config, pp: Preprocessor, model: torch.nn.Module, split: str,
                slices: list[str] | None = None) -> dict[str, np.ndarray]:
    """Predictions for every row of a split (arrays of a few numbers per row come back to the driver)."""
    arch = model_arch(cfg.model, fields_of(pp), len(pp.num_columns))
    weights = save_weights({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    ds = usable_rows(split_dataset(cfg)[0], cfg)  # quarantined rows are not scored either
    scored = ds.map_batches(Scorer, fn_constructor_args=(pp.to_json(), arch, weights, SPLIT_NAMES.index(split),
                                                         slices or []),
                            batch_format="pyarrow", batch_size=cfg.data.batch_size, concurrency=1)
    table = pa.concat_tables([b for b in ray.get(scored.to_arrow_refs()) if b.num_rows])
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


def slice_aucs(pred: dict[str, np.ndarray], names: list[str], top: int = 8) -> dict[str, list[dict]]:
    out = {}
    for name in names:
        vals = pred[f"slice:{name}"]
        uniq, counts = np.unique(vals, return_counts=True)
        rows = []
        for i in np.argsort(-counts)[:top]:
            m = vals == uniq[i]
            y, p = pred["y"][m], pred["p"][m]
            rows.append({"value": str(uniq[i]), "rows": int(m.sum()), "label_rate": float(y.mean()),
                         "auc": float(roc_auc(y, p)) if 0 < y.sum() < len(y) else float("nan")})
        out[name] = rows
    return out


def evaluate_model(cfg: Config, pp: Preprocessor, model: torch.nn.Module, split: str = "test", *,
                   history: list[dict] | None = None, meta: dict | None = None) -> dict[str, Any]:
    names = slice_features(pp)
    pred = score_split(cfg, pp, model, split, names)
    oracle = pred["o"] if not np.isnan(pred["o"]).any() and cfg.features.oracle else None
    metrics = compute_metrics(pred["y"], np.clip(pred["p"], 0, 1), group=pred["g"] if cfg.features.group else None,
                              p_true=oracle)
    slices = slice_aucs(pred, names)
    html = evaluation_report(title=f"rankray evaluation: {cfg.run.name} ({split} split)", metrics=metrics,
                             y=pred["y"], p=pred["p"], slices=slices, history=history, meta=meta)
    return {"metrics": metrics, "html": html, "slices": slices, "rows": len(pred["y"])}


def write_evaluation(out_dir: str, ev: dict[str, Any], cfg: Config) -> None:
    s3 = s3_options(cfg)
    storage.write_text(storage.join(out_dir, "report.html"), ev["html"], s3)
    storage.write_text(storage.join(out_dir, "metrics.json"),
                       json.dumps({"metrics": ev["metrics"], "slices": ev["slices"], "rows": ev["rows"]}, indent=2), s3)
