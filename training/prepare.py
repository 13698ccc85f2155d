"""One distributed statistics pass (Ray Data groupby) gives the data profile and the fitted
preprocessor; one map_batches pass encodes every split into cached Parquet shards."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data
from ray.data.aggregate import Max, Min, Sum

from raycluster.config import CategoricalFeature, Config, MultiHotFeature, NumericFeature
from training import storage
from training.data import SPLIT, SPLIT_NAMES, s3_options, split_dataset
from training.features import DataError, Preprocessor, raw_values

NULL = "\u2400null"  # no NUL byte: numpy->Arrow string conversion stops at one
_LABEL = "\u2400label"
_ROWS = "\u2400rows"
_STAT_COLS = ("count", "label_sum", "sum", "sumsq", "min", "max")


class PartialStats:
    """One batch -> a small table of (split, feature, value) partial sums."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def _rows(self, split: np.ndarray, feature: str, value: pa.Array, label: np.ndarray,
              x: np.ndarray | None = None) -> pa.Table:
        t = pa.table({"split": split, "value": value, "label": label,
                      "x": x if x is not None else np.zeros(len(split))})
        t = t.append_column("x2", pc.multiply(t["x"], t["x"]))
        g = t.group_by(["split", "value"]).aggregate([("label", "count"), ("label", "sum"), ("x", "sum"),
                                                      ("x2", "sum"), ("x", "min"), ("x", "max")])
        return pa.table({"split": g["split"], "feature": pa.array([feature] * g.num_rows, pa.string()),
                         "value": g["value"], "count": g["label_count"], "label_sum": g["label_sum"],
                         "sum": g["x_sum"], "sumsq": g["x2_sum"], "min": g["x_min"], "max": g["x_max"]})

    def __call__(self, table: pa.Table) -> pa.Table:
        f = self.cfg.features
        split = table.column(SPLIT).to_numpy()
        raw = table.column(f.label)
        cols = {c: table.column(c) for c in table.column_names}
        lab = pc.cast(raw, pa.float64()).to_numpy(zero_copy_only=False) if raw.null_count < len(raw) else np.full(len(raw), np.nan)
        if f.label_threshold is not None:
            labstr = np.where(np.isnan(lab), "null", np.where(lab >= f.label_threshold, "1", "0"))
        else:
            labstr = np.where(np.isnan(lab), "null", np.where(lab == 1, "1", np.where(lab == 0, "0", "invalid")))
        y = (labstr == "1").astype(np.float64)
        parts = [self._rows(split, _LABEL, pa.array(labstr), y),
                 self._rows(split, _ROWS, pa.array(np.full(len(y), "")), y)]
        for feat in f.features:
            arr = raw_values(feat, cols)
            if isinstance(feat, NumericFeature):
                x = arr.to_numpy(zero_copy_only=False).astype(np.float64)
                ok = np.isfinite(x)
                tx = np.sign(x) * np.log1p(np.abs(x)) if feat.transform == "log1p" else x
                value = pa.array(np.where(ok, "", NULL))
                parts.append(self._rows(split, feat.name, value, y, np.where(ok, tx, 0.0)))
                continue
            if isinstance(feat, MultiHotFeature):
                lists = arr.fill_null(pa.scalar([], arr.type)) if arr.null_count else arr
                parent = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
                flat = pc.list_flatten(lists)
                nulls = np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))
                parent = np.concatenate([parent, nulls])
                values = pa.concat_arrays([pc.cast(flat, pa.string()), pa.array([None] * len(nulls), pa.string())])
                parts.append(self._rows(split[parent], feat.name, values.fill_null(NULL), y[parent]))
                continue
            parts.append(self._rows(split, feat.name, pc.cast(arr, pa.string()).fill_null(NULL), y))
        return pa.concat_tables(parts)


@dataclass
class Stats:
    """Global (split, feature, value) sums as a pandas frame, small: one row per distinct value."""
    frame: object

    def of(self, feature: str, splits: tuple[int, ...] = (0, 1, 2)):
        df = self.frame
        sub = df[(df["feature"] == feature) & (df["split"].isin(splits))]
        return sub.groupby("value", as_index=False).agg(
            count=("count", "sum"), label_sum=("label_sum", "sum"), sum=("sum", "sum"),
            sumsq=("sumsq", "sum"), min=("min", "min"), max=("max", "max"))


def compute_stats(ds: ray.data.Dataset, cfg: Config) -> Stats:
    partial = ds.map_batches(PartialStats(cfg), batch_format="pyarrow", batch_size=cfg.data.batch_size)
    agg = partial.groupby(["split", "feature", "value"], num_partitions=4).aggregate(
        *[Sum(c, alias_name=c) for c in _STAT_COLS[:4]], Min("min", alias_name="min"), Max("max", alias_name="max"))
    stats = Stats(agg.to_pandas())
    _validate_labels(stats, cfg)
    return stats


def _validate_labels(stats: Stats, cfg: Config) -> None:
    lab = stats.of(_LABEL).set_index("value")["count"]
    col = cfg.features.label
    if lab.get("null", 0):
        raise DataError(f"label column {col!r}: {int(lab['null'])} rows have a null label")
    if lab.get("invalid", 0):
        raise DataError(f"label column {col!r}: {int(lab['invalid'])} rows are not 0/1; "
                        "set features.label_threshold to binarize a score")
    rows = stats.of(_ROWS, (0,))["count"].sum()
    if rows == 0:
        raise DataError("the train split is empty: no rows were read (check data.source and the split)")
    if lab.get("1", 0) == 0 or lab.get("0", 0) == 0:
        raise DataError(f"label column {col!r}: needs both 0 and 1 labels, got {dict(lab.astype(int))}")


def fit_preprocessor(stats: Stats, cfg: Config, schema: pa.Schema) -> Preprocessor:
    """Vocabularies by train-split frequency; numeric mean/std after the transform."""
    pp = Preprocessor(cfg.features)
    for f in cfg.features.features:
        s = stats.of(f.name, (0,))
        if isinstance(f, NumericFeature):
            ok = s[s["value"] == ""]
            n = float(ok["count"].sum())
            mean = float(ok["sum"].sum()) / n if n else 0.0
            var = float(ok["sumsq"].sum()) / n - mean * mean if n else 1.0
            std = math.sqrt(var) if var > 1e-12 else 1.0
            pp.mean[f.name], pp.std[f.name] = mean, std
            fill = mean if f.fill is None else (math.copysign(math.log1p(abs(f.fill)), f.fill)
                                                if f.transform == "log1p" else f.fill)
            pp.fill[f.name] = fill
            continue
        if isinstance(f, CategoricalFeature) and f.hash_buckets:
            continue
        s = s[(s["value"] != NULL) & (s["count"] >= f.min_count)].sort_values(["count", "value"], ascending=[False, True])
        if f.max_vocab:
            s = s.head(f.max_vocab)
        pp.vocab[f.name] = _typed(pa.array(s["value"].tolist(), pa.string()), _value_type(f, schema))
    return pp


def _value_type(f: CategoricalFeature | MultiHotFeature, schema: pa.Schema) -> pa.DataType:
    t = schema.field(f.column).type if f.column in schema.names else pa.string()
    if isinstance(f, MultiHotFeature) and (pa.types.is_list(t) or pa.types.is_large_list(t)):
        t = t.value_type
    return pa.int64() if (pa.types.is_integer(t) and not f.regex and not getattr(f, "sep", None)) else pa.string()


def _typed(values: pa.Array, t: pa.DataType) -> pa.Array:
    return pc.cast(values, t) if t != pa.string() else values


def profile(stats: Stats, cfg: Config, top: int = 5) -> dict:
    """Rows, label rate, and per feature: cardinality, nulls, top values with their label rate."""
    rows = {SPLIT_NAMES[int(r.split)]: int(r.count) for r in stats.frame[stats.frame["feature"] == _ROWS].itertuples()}
    lab = stats.of(_ROWS)
    out = {"rows": int(lab["count"].sum()), "rows_by_split": rows,
           "label_rate": float(lab["label_sum"].sum() / max(lab["count"].sum(), 1)), "features": {}}
    for f in cfg.features.features:
        s = stats.of(f.name)
        nulls = int(s.loc[s["value"] == NULL, "count"].sum())
        if isinstance(f, NumericFeature):
            ok = s[s["value"] == ""]
            n = float(ok["count"].sum())
            mean = float(ok["sum"].sum()) / n if n else float("nan")
            out["features"][f.name] = {"type": f.type, "nulls": nulls, "count": int(n), "mean": mean,
                                       "min": float(ok["min"].min()), "max": float(ok["max"].max()),
                                       "transform": f.transform}
            continue
        vals = s[s["value"] != NULL].sort_values(["count", "value"], ascending=[False, True])
        out["features"][f.name] = {
            "type": f.type, "nulls": nulls, "cardinality": int(len(vals)),
            "top": [{"value": v.value, "count": int(v.count), "label_rate": float(v.label_sum / v.count)}
                    for v in vals.head(top).itertuples()]}
    return out


def format_profile(p: dict) -> str:
    lines = [f"rows {p['rows']:,}  " + "  ".join(f"{k} {v:,}" for k, v in sorted(p["rows_by_split"].items()))
             + f"  label rate {p['label_rate']:.4f}", ""]
    lines.append(f"{'feature':<18} {'type':<12} {'nulls':>8} {'cardinality':>11}  top values (count, label rate)")
    for name, f in p["features"].items():
        if f["type"] == "numeric":
            desc = f"mean {f['mean']:.4g} ({f['transform']})  min {f['min']:.4g}  max {f['max']:.4g}"
            lines.append(f"{name:<18} {f['type']:<12} {f['nulls']:>8,} {'-':>11}  {desc}")
        else:
            desc = ", ".join(f"{t['value'][:16]} ({t['count']:,}, {t['label_rate']:.3f})" for t in f["top"][:3])
            lines.append(f"{name:<18} {f['type']:<12} {f['nulls']:>8,} {f['cardinality']:>11,}  {desc}")
    return "\n".join(lines)


class Encoder:
    """Ray Data UDF: raw joined batch -> encoded columns + split name, via the preprocessor."""

    def __init__(self, pp_json: str) -> None:
        self.pp = Preprocessor.from_json(pp_json)

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        out = self.pp.transform({c: table.column(c) for c in table.column_names})
        out["split"] = np.asarray(SPLIT_NAMES)[table.column(SPLIT).to_numpy()]
        return out


def encode(ds: ray.data.Dataset, pp: Preprocessor, out_dir: str, cfg: Config) -> None:
    """Encode once and cache: `out_dir/split=train|valid|test/*.parquet` (int32 slots, float32 numerics)."""
    s3 = s3_options(cfg)
    storage.delete_dir(out_dir, s3)
    fs, inner = storage.filesystem(out_dir, s3)
    enc = ds.map_batches(Encoder, fn_constructor_args=(pp.to_json(),), batch_format="pyarrow",
                         batch_size=cfg.data.batch_size, concurrency=(1, 8))
    enc.write_parquet(inner, filesystem=fs, partition_cols=["split"], min_rows_per_file=cfg.data.batch_size * 16)


def prepare(cfg: Config, out_dir: str | None = None) -> dict:
    """Read, validate, split, profile, fit and encode. Writes under `{run_dir}/data` and returns
    the paths and the profile."""
    s3 = s3_options(cfg)
    base = out_dir or storage.join(cfg.run_dir, "data")
    t0 = time.time()
    ds, schema = split_dataset(cfg)
    stats = compute_stats(ds, cfg)
    pp = fit_preprocessor(stats, cfg, schema)
    prof = profile(stats, cfg)
    t1 = time.time()
    encode(ds, pp, storage.join(base, "encoded"), cfg)
    t2 = time.time()
    storage.write_text(storage.join(base, "preprocessor.json"), pp.to_json(), s3)
    storage.write_text(storage.join(base, "profile.json"), json.dumps(prof, indent=2), s3)
    return {"dir": base, "encoded": storage.join(base, "encoded"), "profile": prof,
            "preprocessor": pp, "fit_seconds": t1 - t0, "encode_seconds": t2 - t1}
