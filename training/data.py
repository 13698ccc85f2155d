"""Read interaction logs (Parquet/CSV, local or s3://) as a streaming Ray Dataset, validate them
against the feature spec, and tag every row with its split (0 train, 1 valid, 2 test)."""
from __future__ import annotations

import contextlib
import posixpath
import re
from collections.abc import Iterator
from typing import Any
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import ray
import ray.data

from training.config import Config, MultiHotFeature, NumericFeature
from training import storage
from training.features import HASH_KEY as _KEY
from training.features import DataError, stable_hash

SPLIT = "__split__"
SPLIT_NAMES = ("train", "valid", "test")
_SKETCH = 1025
_COUNT_KEY = "__count_key__"


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
    """A file, directory or glob of Parquet/CSV as a lazy, streaming Ray Dataset. Parquet files are
    checked first (footers only): each must be readable, all must have the same columns with
    compatible types, and together they must hold rows; errors name the file and the column."""
    s3 = s3_options(cfg)
    try:
        files = storage.list_files(path, s3)
    except OSError as e:
        raise DataError(f"data source {path}: {e}") from None
    fs, _ = storage.filesystem(path, s3)
    fmt = _format(files, cfg.data.format, path)
    if fmt == "parquet":
        check_parquet_files(files, fs, path)
        # the default (v2) reader: its read errors name the file (`read_errors`); the faster v1 reader's do not
        return ray.data.read_parquet(files, filesystem=fs, file_extensions=None)
    return ray.data.read_csv(files, filesystem=fs)


def read_parquet_files(files: list[str], fs: Any, **kw: Any) -> ray.data.Dataset:
    """Listed Parquet files (rankray's own encoded shards) with Ray Data's file-based (v1) reader: it starts
    reading in ~0.15 s where the default (v2) reader lists the files again for 1-4 s, and a streamed split
    pays that start every epoch and every evaluation."""
    ctx = ray.data.DataContext.get_current()
    v2, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        return ray.data.read_parquet(files, filesystem=fs, file_extensions=None, **kw)
    finally:
        ctx.use_datasource_v2 = v2


def _shown(f: str, path: str) -> str:
    """A file as the user wrote its source: s3://bucket/key for S3 (files are listed without it)."""
    return f"s3://{f}" if storage.is_s3(path) and not f.startswith("s3://") else f


def _kind(t: pa.DataType) -> str:
    """Types that read the same for rankray: widths and string flavours do not matter; integers
    and floats mix (the column is read as numbers either way); a null column fits anything."""
    if pa.types.is_null(t):
        return "null"
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "number"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "binary"
    if pa.types.is_dictionary(t):
        return _kind(t.value_type)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t):
        return f"list<{_kind(t.value_type)}>"
    if pa.types.is_timestamp(t):
        return "timestamp"
    return str(t)


def check_parquet_files(files: list[str], fs, path: str) -> None:
    """Read every file's footer (in parallel threads: one small request per file): a corrupt or
    truncated file, a file whose columns or types differ from the first file's, or files without
    a single row are refused before any Ray work, naming the file and the column."""
    def footer(f: str) -> tuple[pa.Schema, int]:
        try:
            with fs.open_input_file(f) as fh:
                pf = pq.ParquetFile(fh)
                return pf.schema_arrow, pf.metadata.num_rows
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{_shown(f, path)}: not a readable Parquet file ({str(e).splitlines()[0]})") from None

    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        footers = list(pool.map(footer, files))
    (ref_schema, _), ref = footers[0], _shown(files[0], path)
    ref_types = dict(zip(ref_schema.names, ref_schema.types))
    for f, (schema, _) in zip(files[1:], footers[1:]):
        here = dict(zip(schema.names, schema.types))
        missing = [c for c in ref_types if c not in here]
        extra = [c for c in here if c not in ref_types]
        if missing or extra:
            what = "; ".join(x for x in (f"missing column(s) {missing}" if missing else "",
                                         f"extra column(s) {extra}" if extra else "") if x)
            raise DataError(f"{_shown(f, path)}: schema differs from {ref}: {what}")
        for c, t in here.items():
            a, b = _kind(t), _kind(ref_types[c])
            if a != b and "null" not in (a, b):
                raise DataError(f"{_shown(f, path)}: column {c!r} has type {t} here but {ref_types[c]} "
                                f"in {ref}: all files of a source need the same column types")
    if sum(n for _, n in footers) == 0:
        raise DataError(f"data source {path}: no rows: its {len(files)} Parquet file(s) are all empty")


_FRAGMENT = re.compile(r"Failed to read fragment (\S+)")


@contextlib.contextmanager
def read_errors() -> Iterator[None]:
    """A file that fails while Ray Data reads it (e.g. a corrupt page the footer check cannot see)
    becomes one DataError naming the file, instead of a worker traceback."""
    try:
        yield
    except DataError:
        raise
    except Exception as e:  # only Ray Data's read failures are rewritten; the rest is re-raised
        m = _FRAGMENT.search(str(e))
        if not m:
            raise
        cause = next((ln.strip() for ln in str(e).splitlines()
                      if ln.startswith(("OSError:", "ArrowInvalid:", "pyarrow.lib.ArrowInvalid:"))), "")
        cause = cause.split(":", 1)[1].strip() if cause else "read error"
        raise DataError(f"{m.group(1)}: cannot read this file ({cause}); "
                        "it is corrupt or not Parquet: fix or remove it") from None


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


def time_numbers(arr: pa.ChunkedArray | pa.Array, name: str, why: str = "") -> np.ndarray:
    """The time column as float seconds; a row without a time is an error (`why` says who needs it)."""
    if pa.types.is_timestamp(arr.type) or pa.types.is_date(arr.type):
        arr = pc.cast(pc.cast(arr, pa.timestamp("s")), pa.int64())
    try:
        t = pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise DataError(f"time column {name!r}: cannot read {arr.type} as a time") from None
    if np.isnan(t).any():
        raise DataError(f"time column {name!r}: {int(np.isnan(t).sum())} rows have no time{why}")
    return t


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
            c1, c2 = self.cutoffs
            return ((t >= c1).astype(np.int8) + (t >= c2).astype(np.int8))
        u = (row_hash(table, self.seed) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
        return ((u >= 1 - self.valid - self.test).astype(np.int8) + (u >= 1 - self.test).astype(np.int8))

    def __call__(self, table: pa.Table) -> pa.Table:
        return table.append_column(SPLIT, pa.array(self.assign(table), pa.int8()))


def earlier_counts(key: pa.Array | pa.ChunkedArray, t: np.ndarray) -> np.ndarray:
    """Per row: how many rows with the same key have a strictly earlier time (rows at the same time
    do not count each other); NaN where the key is null."""
    key = key.combine_chunks() if isinstance(key, pa.ChunkedArray) else key
    code = pc.dictionary_encode(key).indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    order = np.lexsort((t, code))
    c, x = code[order], t[order]
    first_of_key = np.searchsorted(c, c, side="left")
    new = np.ones(len(c), bool)
    new[1:] = (c[1:] != c[:-1]) | (x[1:] != x[:-1])
    first_of_time = np.maximum.accumulate(np.where(new, np.arange(len(c)), 0))  # first row of (key, time)
    out = np.empty(len(c))
    out[order] = first_of_time - first_of_key
    out[code < 0] = np.nan
    return out


class _CountKey:
    """Adds an int64 hash of the `count_by` column to group on (null keys form one group)."""

    def __init__(self, column: str) -> None:
        self.column = column

    def __call__(self, table: pa.Table) -> pa.Table:
        return table.append_column(_COUNT_KEY, pa.array(stable_hash(table.column(self.column).combine_chunks()).view(np.int64)))


def _count_group(table: pa.Table, name: str, key: str, time_col: str) -> pa.Table:
    """`map_groups` UDF: the rows of one key's group get the count feature's column."""
    t = time_numbers(table.column(time_col), time_col, f" (count feature {name!r} orders rows by it)")
    n = earlier_counts(table.column(key), t)
    return table.drop_columns([_COUNT_KEY]).append_column(name, pa.array(n, mask=np.isnan(n)))


def with_counts(ds: ray.data.Dataset, cfg: Config) -> ray.data.Dataset:
    """Adds every `count_by` feature's column: one group-by per key, then the rows are materialized
    (the object store keeps them) so the passes after this one do not shuffle again."""
    f = cfg.features
    if not f.count_features:
        return ds
    for c in f.count_features:
        ds = (ds.map_batches(_CountKey(c.count_by), batch_format="pyarrow", batch_size=None)
              .groupby(_COUNT_KEY).map_groups(_count_group, batch_format="pyarrow",
                                              fn_kwargs={"name": c.name, "key": c.count_by, "time_col": f.time}))
    with read_errors():
        return ds.materialize()


LABEL_OK, LABEL_NULL, LABEL_INVALID = 0, 2, 3  # label codes besides 1; null/invalid are the bad rows
BAD_LABEL_REASONS = {LABEL_NULL: "null label", LABEL_INVALID: "label not 0/1"}
REASON = "__reason__"


def label_codes(arr: pa.ChunkedArray | pa.Array, threshold: float | None) -> np.ndarray:
    """Per row: 0 or 1 (the label), 2 null (or NaN), 3 not 0/1 (only without a threshold)."""
    lab = pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)  # nulls -> nan
    if threshold is not None:
        return np.where(np.isnan(lab), LABEL_NULL, (lab >= threshold).astype(np.int64))
    return np.where(np.isnan(lab), LABEL_NULL, np.where(lab == 1, 1, np.where(lab == 0, 0, LABEL_INVALID)))


class LabelFilter:
    """Ray Data UDF for `data.bad_rows: quarantine`: keeps the rows with a usable label, or
    (`bad=True`) only the others, without the split column and with the reason."""

    def __init__(self, label: str, threshold: float | None, bad: bool = False) -> None:
        self.label, self.threshold, self.bad = label, threshold, bad

    def __call__(self, table: pa.Table) -> pa.Table:
        code = label_codes(table.column(self.label), self.threshold)
        is_bad = code >= LABEL_NULL
        if not self.bad:
            return table.filter(pa.array(~is_bad))
        out = table.filter(pa.array(is_bad))
        out = out.drop_columns([SPLIT]) if SPLIT in out.column_names else out
        reasons = [BAD_LABEL_REASONS[int(c)] for c in code[is_bad]]
        return out.append_column(REASON, pa.array(reasons, pa.string()))


def usable_rows(ds: ray.data.Dataset, cfg: Config, bad: bool = False) -> ray.data.Dataset:
    """With `data.bad_rows: quarantine`, the rows with a usable label (or, `bad=True`, the others);
    with `error`, `ds` itself (bad labels stop the statistics pass)."""
    if cfg.data.bad_rows != "quarantine":
        return ds
    f = cfg.features
    return ds.map_batches(LabelFilter(f.label, f.label_threshold, bad), batch_format="pyarrow", batch_size=None)


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
    if schema is None:  # Ray Data found no block at all (e.g. CSV files with a header only)
        raise DataError(f"data source {where}: no rows: nothing could be read from its files")
    have = dict(zip(schema.names, schema.types))
    counts = f.count_features
    made_here = {x.name for x in counts}
    needed = [(f.label, "label")] + [(x.column, f"feature {x.name!r}") for x in f.features if x.name not in made_here]
    needed += [(x.count_by, f"count_by of feature {x.name!r}") for x in counts]
    needed += [(c, role) for c, role in ((f.group, "group"), (f.time, "time"), (f.oracle, "oracle")) if c]
    missing = [f"{c!r} ({role})" for c, role in needed if c not in have]
    if missing:
        raise DataError(f"{where}: missing column(s) {', '.join(missing)}; columns present: {sorted(have)}")
    made = sorted(made_here & set(have))
    if made:
        raise DataError(f"{where}: column(s) {made} already exist, but count_by features make them: "
                        "rename the feature or drop count_by to use the column as it is")
    lab = have[f.label]
    if not (pa.types.is_integer(lab) or pa.types.is_floating(lab) or pa.types.is_boolean(lab)):
        raise DataError(f"{where}: label column {f.label!r} has type {lab}, expected 0/1 numbers or booleans")
    for x in f.features:
        if x.regex or x.name in made_here:
            continue
        t = have[x.column]
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
    if schema is None:
        return ds, schema  # no rows: _check_schema says so
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
        if not len(x):
            return pa.table({"q": pa.array([], pa.list_(pa.float64())), "n": pa.array([], pa.int64())})
        return pa.table({"q": [np.quantile(x, probs)], "n": [len(x)]})

    with read_errors():
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


def check_given_types(schemas: list[tuple[str, pa.Schema]], cfg: Config) -> None:
    """Given splits are read as one table: a column must read the same in every source (ids as ints in
    train and as strings in valid would meet only at the union, after the work). Compares the schemas the
    sources were read with; the error names each source's first file and both types."""
    seen: dict[str, tuple[pa.DataType, str]] = {}
    for src, schema in schemas:
        for name, t in zip(schema.names, schema.types):
            t0, src0 = seen.setdefault(name, (t, src))
            if "null" not in (_kind(t), _kind(t0)) and _kind(t) != _kind(t0):
                a, b = (_shown(storage.list_files(x, s3_options(cfg))[0], x) for x in (src0, src))
                raise DataError(f"column {name!r} has type {t0} in {a} but {t} in {b}: "
                                "the train, valid and test sources need the same column types")


RAW_EXPANSION = 10  # Arrow rows in memory per byte of source file (Parquet is compressed and dictionary-encoded)
RAW_FRACTION = 0.25  # of the free object store


def small_enough_to_keep(cfg: Config) -> bool:
    """Whether the raw rows fit comfortably in the object store (file sizes x RAW_EXPANSION): prepare then
    reads the sources once and passes over memory (on 1,400 rows in three given sources: 16-23 s -> 7-11 s),
    instead of reading them again for the stats, the encoding and the samples. `data.materialize: false`
    keeps them streamed."""
    if cfg.data.materialize is False:
        return False
    s3 = s3_options(cfg)
    srcs = (cfg.data.train, cfg.data.valid, cfg.data.test) if cfg.data.split.kind == "given" else (cfg.data.source,)
    size = 0
    for src in srcs:
        fs, _ = storage.filesystem(src, s3)
        size += sum(i.size or 0 for i in fs.get_file_info(storage.list_files(src, s3)))
    free = ray.available_resources().get("object_store_memory", 0)
    return size * RAW_EXPANSION < RAW_FRACTION * free


def split_dataset(cfg: Config) -> tuple[ray.data.Dataset, pa.Schema]:
    """All rows of the configured sources, joined, schema-checked, with a `__split__` column and the
    `count_by` features' columns; and the raw (joined) schema with those columns."""
    sp = cfg.data.split
    if sp.kind == "given":
        parts, schemas = [], []
        for i, src in enumerate((cfg.data.train, cfg.data.valid, cfg.data.test)):
            ds, schema = _with_joins(read_source(src, cfg), cfg)
            _check_schema(schema, cfg, src)
            schemas.append((src, schema))
            parts.append(ds.map_batches(Splitter("given", 0, 0, 0, fixed=i), batch_format="pyarrow", batch_size=None))
        check_given_types(schemas, cfg)
        ds = parts[0].union(*parts[1:])
    else:
        ds, schema = _with_joins(read_source(cfg.data.source, cfg), cfg)
        _check_schema(schema, cfg, cfg.data.source)
        cut = time_cutoffs(ds, cfg) if sp.kind == "time" else None
        splitter = Splitter(sp.kind, sp.valid_fraction, sp.test_fraction, sp.seed, cfg.features.time, cut)
        ds = ds.map_batches(splitter, batch_format="pyarrow", batch_size=None)
    for c in cfg.features.count_features:
        schema = schema.append(pa.field(c.name, pa.float64()))
    return with_counts(ds, cfg), schema
