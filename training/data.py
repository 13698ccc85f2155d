"""Read interaction logs (Parquet/CSV, local or s3://) as a streaming Ray Dataset, validate them
against the feature spec, and tag every row with its split (0 train, 1 valid, 2 test)."""
from __future__ import annotations

import posixpath

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import ray
import ray.data

from raycluster.config import Config, MultiHotFeature, NumericFeature
from training import storage
from training.features import HASH_KEY as _KEY
from training.features import DataError

SPLIT = "__split__"
SPLIT_NAMES = ("train", "valid", "test")
_SKETCH = 1025


def s3_options(cfg: Config) -> storage.S3Options:
    return storage.S3Options(cfg.data.s3.endpoint_url, cfg.data.s3.region)


def _format(files: list[str], fmt: str, path: str) -> str:
    if fmt != "auto":
        return fmt
    kinds = {"parquet" if f.endswith((".parquet", ".pq")) else "csv" if ".csv" in posixpath.basename(f) else "?" for f in files}
    if len(kinds) != 1 or "?" in kinds:
        raise DataError(f"{path}: cannot tell the format from the file names; set data.format to parquet or csv")
    return kinds.pop()


def read_source(path: str, cfg: Config) -> ray.data.Dataset:
    """A file, directory or glob of Parquet/CSV as a lazy, streaming Ray Dataset."""
    s3 = s3_options(cfg)
    try:
        files = storage.list_files(path, s3)
    except OSError as e:
        raise DataError(f"data source {path}: {e}") from None
    fs, _ = storage.filesystem(path, s3)
    fmt = _format(files, cfg.data.format, path)
    if fmt == "parquet":
        return ray.data.read_parquet(files, filesystem=fs, file_extensions=None)
    return ray.data.read_csv(files, filesystem=fs)


def _read_side_table(path: str, cfg: Config) -> pa.Table:
    """A join's side table is small (e.g. movies for ratings): read once on the driver."""
    s3 = s3_options(cfg)
    files = storage.list_files(path, s3)
    fs, _ = storage.filesystem(path, s3)
    fmt = _format(files, "auto", path)
    tables = []
    for f in files:
        with fs.open_input_file(f) as fh:
            tables.append(pq.read_table(fh) if fmt == "parquet" else pacsv.read_csv(fh))
    return pa.concat_tables(tables)


def _splitmix(h: np.ndarray) -> np.ndarray:
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def row_hash(table: pa.Table, seed: int) -> np.ndarray:
    """A uint64 per row from its content only (not its position), so a split is the same however
    the files are re-read or re-partitioned."""
    h = np.full(table.num_rows, (seed * 0x9E3779B97F4A7C15 + 1) % (1 << 64), np.uint64)
    for name in sorted(c for c in table.column_names if c != SPLIT):
        col = table.column(name).combine_chunks()
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            flat = pd.util.hash_array(pc.list_flatten(col).to_numpy(zero_copy_only=False), hash_key=_KEY)
            lengths = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False)
            ends = np.cumsum(lengths)
            sums = np.concatenate([[0], np.cumsum(flat, dtype=np.uint64)])  # wraps mod 2**64, on purpose
            hc = sums[ends] - sums[ends - lengths]
        else:
            hc = pd.util.hash_array(col.to_numpy(zero_copy_only=False), hash_key=_KEY)
        h = _splitmix(h ^ hc)
    return h


def time_numbers(arr: pa.ChunkedArray | pa.Array, name: str) -> np.ndarray:
    if pa.types.is_timestamp(arr.type) or pa.types.is_date(arr.type):
        arr = pc.cast(pc.cast(arr, pa.timestamp("s")), pa.int64())
    try:
        return pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise DataError(f"time column {name!r}: cannot read {arr.type} as a time") from None


class Splitter:
    """Adds the `__split__` column to a batch: random (by row hash), time (by cutoffs) or given."""

    def __init__(self, kind: str, valid: float, test: float, seed: int, time_col: str | None = None,
                 cutoffs: tuple[float, float] | None = None, fixed: int | None = None) -> None:
        self.kind, self.valid, self.test, self.seed = kind, valid, test, seed
        self.time_col, self.cutoffs, self.fixed = time_col, cutoffs, fixed

    def assign(self, table: pa.Table) -> np.ndarray:
        if self.fixed is not None:
            return np.full(table.num_rows, self.fixed, np.int8)
        if self.kind == "time":
            t = time_numbers(table.column(self.time_col), self.time_col)
            if np.isnan(t).any():
                raise DataError(f"time column {self.time_col!r}: {int(np.isnan(t).sum())} rows have no time")
            c1, c2 = self.cutoffs
            return ((t >= c1).astype(np.int8) + (t >= c2).astype(np.int8))
        u = (row_hash(table, self.seed) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
        return ((u >= 1 - self.valid - self.test).astype(np.int8) + (u >= 1 - self.test).astype(np.int8))

    def __call__(self, table: pa.Table) -> pa.Table:
        return table.append_column(SPLIT, pa.array(self.assign(table), pa.int8()))


class Joiner:
    def __init__(self, sides: list[tuple[pa.Table, str]]) -> None:
        self.sides = sides

    def __call__(self, table: pa.Table) -> pa.Table:
        for side, on in self.sides:
            table = table.join(side, keys=on, join_type="left outer")
        return table


def _check_schema(schema: pa.Schema, cfg: Config, where: str) -> None:
    """Fail before any work with a message naming the column."""
    f = cfg.features
    have = dict(zip(schema.names, schema.types))
    needed = [(f.label, "label")] + [(x.column, f"feature {x.name!r}") for x in f.features]
    needed += [(c, role) for c, role in ((f.group, "group"), (f.time, "time"), (f.oracle, "oracle")) if c]
    missing = [f"{c!r} ({role})" for c, role in needed if c not in have]
    if missing:
        raise DataError(f"{where}: missing column(s) {', '.join(missing)}; columns present: {sorted(have)}")
    lab = have[f.label]
    if not (pa.types.is_integer(lab) or pa.types.is_floating(lab) or pa.types.is_boolean(lab)):
        raise DataError(f"{where}: label column {f.label!r} has type {lab}, expected 0/1 numbers or booleans")
    for x in f.features:
        t = have[x.column]
        if x.regex:
            continue
        if isinstance(x, NumericFeature) and not (pa.types.is_integer(t) or pa.types.is_floating(t)
                                                  or pa.types.is_boolean(t) or pa.types.is_decimal(t)):
            raise DataError(f"{where}: numeric feature {x.name!r} (column {x.column!r}) has type {t}")
        if isinstance(x, MultiHotFeature) and x.sep is None and not (pa.types.is_list(t) or pa.types.is_large_list(t)):
            raise DataError(f"{where}: multi_hot feature {x.name!r} (column {x.column!r}) has type {t}: "
                            "give a list column or set `sep` to split a string")
        if not isinstance(x, (NumericFeature, MultiHotFeature)) and (pa.types.is_nested(t)):
            raise DataError(f"{where}: categorical feature {x.name!r} (column {x.column!r}) has nested type {t}")


def _with_joins(ds: ray.data.Dataset, cfg: Config) -> tuple[ray.data.Dataset, pa.Schema]:
    schema = ds.schema()  # one call: for CSV it reads a file to infer the types
    schema = schema.base_schema if hasattr(schema, "base_schema") else schema
    sides = []
    for j in cfg.data.joins:
        side = _read_side_table(j.path, cfg)
        keep = [j.on] + [c for c in (j.columns or side.column_names) if c != j.on]
        if j.on not in side.column_names or j.on not in schema.names:
            raise DataError(f"join with {j.path}: key column {j.on!r} is missing on one side")
        side = side.select(keep)
        sides.append((side, j.on))
        for c in keep[1:]:
            schema = schema.append(side.schema.field(c))
    if sides:
        ds = ds.map_batches(Joiner(sides), batch_format="pyarrow", batch_size=None)
    return ds, schema


def time_cutoffs(ds: ray.data.Dataset, cfg: Config) -> tuple[float, float]:
    """Valid/test start times in one pass over the time column: every block sends a quantile sketch
    (1025 points and its row count); the driver merges the sketches (blocks x 1025 numbers)."""
    col, sp = cfg.features.time, cfg.data.split
    if not col:
        raise DataError("split.kind 'time' needs features.time (the time column)")
    probs = np.linspace(0, 1, _SKETCH)

    def sketch(t: pa.Table) -> pa.Table:
        x = time_numbers(t.column(col), col)
        if np.isnan(x).any():
            raise DataError(f"time column {col!r}: {int(np.isnan(x).sum())} rows have no time")
        if not len(x):
            return pa.table({"q": pa.array([], pa.list_(pa.float64())), "n": pa.array([], pa.int64())})
        return pa.table({"q": [np.quantile(x, probs)], "n": [len(x)]})

    parts = pa.concat_tables(ray.get(ds.select_columns([col]).map_batches(
        sketch, batch_format="pyarrow", batch_size=None).to_arrow_refs()))
    q = np.concatenate([np.asarray(v) for v in parts["q"].to_pylist()])
    w = np.repeat(parts["n"].to_numpy() / _SKETCH, _SKETCH)
    order = np.argsort(q, kind="stable")
    q, cdf = q[order], np.cumsum(w[order]) / w.sum()
    if q[-1] <= q[0]:
        raise DataError(f"time column {col!r}: all rows have the same time; a time split is impossible")
    c1 = q[min(np.searchsorted(cdf, 1 - sp.valid_fraction - sp.test_fraction), len(q) - 1)]
    c2 = q[min(np.searchsorted(cdf, 1 - sp.test_fraction), len(q) - 1)]
    return float(c1), float(c2)


def split_dataset(cfg: Config) -> tuple[ray.data.Dataset, pa.Schema]:
    """All rows of the configured sources, joined, schema-checked, with a `__split__` column;
    and the raw (joined) schema."""
    sp = cfg.data.split
    if sp.kind == "given":
        parts = []
        for i, src in enumerate((cfg.data.train, cfg.data.valid, cfg.data.test)):
            ds, schema = _with_joins(read_source(src, cfg), cfg)
            _check_schema(schema, cfg, src)
            parts.append(ds.map_batches(Splitter("given", 0, 0, 0, fixed=i), batch_format="pyarrow", batch_size=None))
        return parts[0].union(*parts[1:]), schema
    ds, schema = _with_joins(read_source(cfg.data.source, cfg), cfg)
    _check_schema(schema, cfg, cfg.data.source)
    cut = time_cutoffs(ds, cfg) if sp.kind == "time" else None
    splitter = Splitter(sp.kind, sp.valid_fraction, sp.test_fraction, sp.seed, cfg.features.time, cut)
    return ds.map_batches(splitter, batch_format="pyarrow", batch_size=None), schema
