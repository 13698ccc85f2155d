"""One distributed statistics pass (Ray Data groupby) gives the data profile and the fitted
preprocessor; one map_batches pass encodes every split into cached Parquet shards."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import ray.data
from ray.data.aggregate import Max, Min, Sum

from training.config import CategoricalFeature, Config, MultiHotFeature, NumericFeature, fingerprint
from training import console, storage, synth
from training.data import (
    LABEL_NULL,
    SPLIT,
    SPLIT_NAMES,
    label_codes,
    read_errors,
    s3_options,
    small_enough_to_keep,
    split_dataset,
    usable_rows,
)
from training.features import DataError, Preprocessor, numeric_transform, raw_values
from training.cache import cached, content_key

ENCODED_FILE_BATCHES = 32  # encoded Parquet files hold at most this many data.batch_size batches
ENCODED_LAYOUT = 2  # in the fingerprint: data encoded with an older file layout is prepared again
NULL = "\u2400null"  # no NUL byte: numpy->Arrow string conversion stops at one
_LABEL = "\u2400label"
_ROWS = "\u2400rows"
_STAT_COLS = ("count", "label_sum", "sum", "sumsq", "min", "max")


class PartialStats:
    """One batch -> a small table of (split, feature, value) partial sums. Categorical values are
    grouped in their own type and only the (small) grouped result is cast to string."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    @staticmethod
    def _table(split: Any, feature: str, value: Any, count: Any, label_sum: Any, sums: Any = None) -> pa.Table:
        def arr(x: Any, t: pa.DataType) -> pa.Array | pa.ChunkedArray:
            return x.cast(t) if isinstance(x, (pa.Array, pa.ChunkedArray)) else pa.array(x, t)

        n = len(split)
        s, s2, lo, hi = sums if sums is not None else (np.zeros(n), np.zeros(n), np.full(n, np.nan), np.full(n, np.nan))
        return pa.table({"split": arr(split, pa.int8()), "feature": pa.repeat(pa.scalar(feature), n),
                         "value": arr(value, pa.string()), "count": arr(count, pa.int64()),
                         "label_sum": arr(label_sum, pa.float64()), "sum": arr(s, pa.float64()),
                         "sumsq": arr(s2, pa.float64()), "min": arr(lo, pa.float64()), "max": arr(hi, pa.float64())})

    def _counts(self, split: np.ndarray, feature: str, value: pa.Array, y: np.ndarray) -> pa.Table:
        g = pa.table({"split": split, "value": value, "y": y}).group_by(["split", "value"]).aggregate(
            [("y", "count"), ("y", "sum")])
        return self._table(g["split"], feature, pc.cast(g["value"], pa.string()).fill_null(NULL),
                           g["y_count"], g["y_sum"])

    def _by_split(self, split: np.ndarray, code: np.ndarray, names: list[str], feature: str, y: np.ndarray,
                  x: np.ndarray | None = None) -> pa.Table:
        """Per (split, code) counts with numpy; with `x`, sums/min/max of x where code == 0."""
        key = split.astype(np.int64) * len(names) + code
        n = np.bincount(key, minlength=3 * len(names))
        ys = np.bincount(key, weights=y, minlength=3 * len(names))
        keep = np.flatnonzero(n)
        sums = None
        if x is not None:
            s = np.bincount(key, weights=x, minlength=3 * len(names))
            s2 = np.bincount(key, weights=x * x, minlength=3 * len(names))
            lo, hi = np.full(len(n), np.nan), np.full(len(n), np.nan)
            for k in keep:
                if k % len(names) == 0:
                    sel = x[key == k]
                    lo[k], hi[k] = sel.min(), sel.max()
            sums = (s[keep], s2[keep], lo[keep], hi[keep])
        return self._table(keep // len(names), feature, [names[k % len(names)] for k in keep], n[keep], ys[keep], sums)

    def __call__(self, table: pa.Table) -> pa.Table:
        f = self.cfg.features
        split = table.column(SPLIT).to_numpy()
        code = label_codes(table.column(f.label), f.label_threshold)
        y = (code == 1).astype(np.float64)
        parts = [self._by_split(split, code, ["0", "1", "null", "invalid"], _LABEL, y)]
        if self.cfg.data.bad_rows == "quarantine":  # bad-label rows are counted above, and only there
            good = code < LABEL_NULL
            if not good.all():
                table, split, y = table.filter(pa.array(good)), split[good], y[good]
        cols = {c: table.column(c) for c in table.column_names}
        parts.append(self._by_split(split, np.zeros(len(y), np.int64), [""], _ROWS, y))
        for feat in f.features:
            arr = raw_values(feat, cols)
            if isinstance(feat, NumericFeature):
                x = arr.to_numpy(zero_copy_only=False).astype(np.float64)
                ok = np.isfinite(x)
                tx = np.where(ok, numeric_transform(np.where(ok, x, 0.0), feat.transform), 0.0)
                parts.append(self._by_split(split, (~ok).astype(np.int64), ["", NULL], feat.name, y, tx))
            elif isinstance(feat, MultiHotFeature):
                lists = arr.fill_null(pa.scalar([], arr.type)) if arr.null_count else arr
                parent = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
                flat = pc.list_flatten(lists)
                nulls = np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))
                values = pa.concat_arrays([flat, pa.nulls(len(nulls), flat.type)])
                parent = np.concatenate([parent, nulls])
                parts.append(self._counts(split[parent], feat.name, values, y[parent]))
            else:
                parts.append(self._counts(split, feat.name, arr, y))
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
    with read_errors():
        frame = agg.to_pandas()
    if frame.empty:  # no rows at all: an empty frame has no columns either
        frame = pd.DataFrame({c: pd.Series(dtype=object if c in ("feature", "value") else float)
                              for c in ("split", "feature", "value") + _STAT_COLS})
    # partitions whose min/max are all null come back as objects with pd.NA: numbers, with NaN, throughout
    frame[list(_STAT_COLS)] = frame[list(_STAT_COLS)].apply(pd.to_numeric, errors="coerce")
    stats = Stats(frame)
    _validate_labels(stats, cfg)
    return stats


def bad_label_rows(stats: Stats) -> int:
    """Rows whose label is null or not 0/1 (with `quarantine` they are left out of everything else)."""
    lab = stats.of(_LABEL).set_index("value")["count"]
    return int(lab.get("null", 0) + lab.get("invalid", 0))


def _validate_labels(stats: Stats, cfg: Config) -> None:
    lab = stats.of(_LABEL).set_index("value")["count"]
    col = cfg.features.label
    if cfg.data.bad_rows != "quarantine":  # with quarantine: counted, and written aside by `prepare`
        hint = " (or set data.bad_rows: quarantine to set such rows aside)"
        if lab.get("null", 0):
            raise DataError(f"label column {col!r}: {int(lab['null'])} rows have a null label{hint}")
        if lab.get("invalid", 0):
            raise DataError(f"label column {col!r}: {int(lab['invalid'])} rows are not 0/1; "
                            f"set features.label_threshold to binarize a score{hint}")
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
            fill = mean if f.fill is None else float(numeric_transform(np.array([f.fill]), f.transform)[0])
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
    if cfg.data.bad_rows == "quarantine":
        out["quarantined_rows"] = bad_label_rows(stats)
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
    if "quarantined_rows" in p:
        where = f" (written to {p['quarantine']})" if p.get("quarantine") else ""
        lines.insert(1, f"quarantined {p['quarantined_rows']:,} rows with a null or non-0/1 label{where}")
    lines.append(f"{'feature':<18} {'type':<12} {'nulls':>8} {'cardinality':>11}  top values (count, label rate)")
    for name, f in p["features"].items():
        if f["type"] == "numeric":
            desc = f"mean {f['mean']:.4g} ({f['transform']})  min {f['min']:.4g}  max {f['max']:.4g}"
            lines.append(f"{name:<18} {f['type']:<12} {f['nulls']:>8,} {'-':>11}  {desc}")
        else:
            desc = ", ".join(f"{t['value'][:16]} ({t['count']:,}, {t['label_rate']:.3f})" for t in f["top"][:3])
            lines.append(f"{name:<18} {f['type']:<12} {f['nulls']:>8,} {f['cardinality']:>11,}  {desc}")
    return "\n".join(lines)


def encode_batch(table: pa.Table, key: str, pp_json: str) -> dict[str, np.ndarray]:
    """Ray Data UDF: raw joined batch -> encoded columns + split name, via the preprocessor (`key`: its
    content key, so each worker process parses it once)."""
    pp = cached(key, lambda: Preprocessor.from_json(pp_json))
    out = pp.transform({c: table.column(c) for c in table.column_names})
    out["split"] = np.asarray(SPLIT_NAMES)[table.column(SPLIT).to_numpy()]
    return out


def encode(ds: ray.data.Dataset, pp: Preprocessor, out_dir: str, cfg: Config) -> None:
    """Encode once and cache: `out_dir/split=train|valid|test/*.parquet` (int32 slots, float32 numerics)."""
    s3 = s3_options(cfg)
    storage.delete_dir(out_dir, s3)
    fs, inner = storage.filesystem(out_dir, s3)
    pp_json = pp.to_json()
    enc = ds.map_batches(encode_batch, fn_args=(content_key(pp_json), pp_json), batch_format="pyarrow",
                         batch_size=cfg.data.batch_size)
    # Bounded files (not one file per split): streamed epochs read them in parallel tasks, blocks
    # stay small in workers, and the training reader can take the files in a new order each epoch.
    with read_errors():
        enc.write_parquet(inner, filesystem=fs, partition_cols=["split"],
                          max_rows_per_file=cfg.data.batch_size * ENCODED_FILE_BATCHES)


def quarantine(ds: ray.data.Dataset, out_dir: str, cfg: Config) -> None:
    """The rows with a null or non-0/1 label, as read plus `__reason__`, in `out_dir/*.parquet`."""
    s3 = s3_options(cfg)
    storage.delete_dir(out_dir, s3)
    fs, inner = storage.filesystem(out_dir, s3)
    with read_errors():
        usable_rows(ds, cfg, bad=True).write_parquet(inner, filesystem=fs)


def _samples(ds: ray.data.Dataset, cfg: Config, n: int = 8) -> list[dict]:
    """A few raw test rows: the bundle keeps them with their scores for serving's self-check."""
    f = cfg.features
    keep = list(dict.fromkeys([x.column for x in f.features] + [c for c in (f.label, f.group) if c]))

    def first(t: pa.Table) -> pa.Table:
        return t.filter(pc.equal(t[SPLIT], 2)).select(keep).slice(0, n)

    with read_errors():
        rows = ds.map_batches(first, batch_format="pyarrow", batch_size=None).take(n)
    return [{k: (v.item() if hasattr(v, "item") else v.tolist() if hasattr(v, "tolist") else v) for k, v in r.items()}
            for r in rows]


def data_fingerprint(cfg: Config) -> str:
    """What the prepared data depends on: the data (not how it is batched or kept) and features sections."""
    return fingerprint(cfg, {"data": ("materialize", "batch_size"), "features": ()}, extra={"layout": ENCODED_LAYOUT})


def ensure_data(cfg: Config) -> None:
    """Generate the configured synthetic dataset when `data.generate` is set and the source is missing."""
    g = cfg.data.generate
    if g is None or storage.exists(cfg.data.source, s3_options(cfg)):
        return
    with console.step(f"generate {g.rows:,} synthetic rows into {cfg.data.source}") as st:
        info = synth.generate(g.rows, cfg.data.source, seed=g.seed, shards=g.shards, s3=s3_options(cfg))
        st["done"] = f"base rate {info['base_rate']:.4f}, Bayes AUC (test) {info['bayes_auc_test']:.4f}"


def prepared(cfg: Config) -> dict | None:
    """The prepared data of this config when it is complete and its data/features sections are unchanged."""
    s3 = s3_options(cfg)
    base = storage.join(cfg.run_dir, "data")
    fp_path = storage.join(base, "fingerprint.txt")
    if not (storage.exists(fp_path, s3) and storage.read_text(fp_path, s3) == data_fingerprint(cfg)):
        return None
    return {"dir": base, "encoded": storage.join(base, "encoded"),
            "preprocessor": Preprocessor.from_json(storage.read_text(storage.join(base, "preprocessor.json"), s3)),
            "profile": json.loads(storage.read_text(storage.join(base, "profile.json"), s3)),
            "samples": json.loads(storage.read_text(storage.join(base, "samples.json"), s3)), "reused": True}


def ensure_prepared(cfg: Config, force: bool = False) -> dict:
    """Prepared data for this config: reused when the data/features sections are unchanged."""
    if not force and (done := prepared(cfg)):
        return done
    ensure_data(cfg)
    base = storage.join(cfg.run_dir, "data")
    res = prepare(cfg, base)
    storage.write_text(storage.join(base, "fingerprint.txt"), data_fingerprint(cfg), s3_options(cfg))  # last: complete
    return {**res, "reused": False}


def prepare(cfg: Config, out_dir: str | None = None) -> dict:
    """Read, validate, split, profile, fit and encode. Writes under `{run_dir}/data` and returns
    the paths and the profile."""
    s3 = s3_options(cfg)
    base = out_dir or storage.join(cfg.run_dir, "data")
    t0 = time.time()
    with console.step("read, split, profile and fit") as st:
        ds, schema = split_dataset(cfg)
        if not cfg.features.count_features and small_enough_to_keep(cfg):  # count_by already keeps them
            with read_errors():
                ds = ds.materialize()
        stats = compute_stats(ds, cfg)
        pp = fit_preprocessor(stats, cfg, schema)
        prof = profile(stats, cfg)
        st["done"] = (f"{prof['rows']:,} rows ("
                      + ", ".join(f"{k} {prof['rows_by_split'].get(k, 0):,}" for k in SPLIT_NAMES)
                      + f"), label rate {prof['label_rate']:.3f}, {len(cfg.features.features)} features")
    if cfg.data.bad_rows == "quarantine":
        qdir = storage.join(base, "quarantine")
        storage.delete_dir(qdir, s3)
        if prof["quarantined_rows"]:
            quarantine(ds, qdir, cfg)
            prof["quarantine"] = qdir
            console.say(f"quarantined {prof['quarantined_rows']:,} rows with a null or non-0/1 label "
                        f"({cfg.features.label!r}) into {qdir}")
        ds = usable_rows(ds, cfg)
    t1 = time.time()
    with console.step("encode") as st:
        encode(ds, pp, storage.join(base, "encoded"), cfg)
        st["done"] = f"{prof['rows']:,} rows ({prof['rows'] / max(time.time() - t1, 1e-9):,.0f} rows/s)"
    t2 = time.time()
    storage.write_text(storage.join(base, "preprocessor.json"), pp.to_json(), s3)
    storage.write_text(storage.join(base, "profile.json"), json.dumps(prof, indent=2), s3)
    samples = _samples(ds, cfg)
    storage.write_text(storage.join(base, "samples.json"), json.dumps(samples), s3)
    return {"dir": base, "encoded": storage.join(base, "encoded"), "profile": prof, "samples": samples,
            "preprocessor": pp, "fit_seconds": t1 - t0, "encode_seconds": t2 - t1}
