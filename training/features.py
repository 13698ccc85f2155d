"""Feature spec -> raw values -> fitted preprocessor -> encoded numpy arrays.

The preprocessor's `transform` is the one function that turns raw rows into model inputs. Ray Data
calls it in `map_batches` at encode time and the Serve replica calls it per request, so training
and serving cannot drift apart. It is saved as plain JSON, never pickled.

Index layout of every categorical or multi-hot field: 0 = padding (multi-hot only),
1 = out-of-vocabulary (unseen, null, or beyond max_vocab), 2.. = vocabulary by frequency.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from training.config import CategoricalFeature, FeaturesConfig, MultiHotFeature, NumericFeature

PAD, OOV, FIRST = 0, 1, 2
Z_MAX = 1e4  # the most standard deviations a numeric input is from its training mean, in the model's units
LABEL, GROUP, ORACLE = "__label__", "__group__", "__oracle__"
HASH_KEY = "rankray-hash-key"  # 16 chars: pandas' siphash key, fixed so hashes are stable everywhere


class DataError(ValueError):
    """Data that cannot be used as the spec says. The message names the column."""


def as_arrow(values: Any, name: str) -> pa.Array:
    """numpy / list / pyarrow (chunked) -> one pa.Array."""
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    if isinstance(values, pa.Array):
        return values
    try:
        if isinstance(values, (list, tuple)):  # numpy would make equal-length lists a 2-D array
            return pa.array(values, from_pandas=True)
        arr = np.asarray(values) if not isinstance(values, np.ndarray) else values
        if arr.dtype == object or arr.ndim > 1:  # objects (lists), or equal-length lists as a 2-D array
            return pa.array(list(arr) if arr.ndim else [arr.item()], from_pandas=True)
        return pa.array(arr)
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as e:
        raise DataError(f"column {name!r}: cannot read values ({e})") from None


def _regex_extract(arr: pa.Array, pattern: str) -> pa.Array:
    """First capture group of `pattern` (null when no match), run once per distinct value."""
    rx = re.compile(pattern)
    strings = pc.cast(arr, pa.string()) if not pa.types.is_string(arr.type) else arr
    uniq = pc.unique(strings)
    found = []
    for v in uniq.to_pylist():
        m = rx.search(v) if v is not None else None
        found.append(m.group(1) if m and m.groups() else (m.group(0) if m else None))
    return pc.take(pa.array(found, pa.string()), pc.index_in(strings, value_set=uniq))


def _numpy(values: Any) -> np.ndarray:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values.to_numpy() if isinstance(values, pa.ChunkedArray) else values.to_numpy(zero_copy_only=False)
    return np.asarray(values)


def raw_values(spec: Any, batch: Mapping[str, Any]) -> pa.Array:
    """The raw values of one feature in a batch: its column, or derived from `source` by `regex`.
    Multi-hot values come back as a list array."""
    if spec.column not in batch:
        raise DataError(f"column {spec.column!r} (feature {spec.name!r}) is missing from the input")
    arr = as_arrow(batch[spec.column], spec.column)
    if spec.regex:
        arr = _regex_extract(arr, spec.regex)
    if isinstance(spec, MultiHotFeature):
        if spec.sep is not None:
            if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type) or pa.types.is_null(arr.type)):
                raise DataError(f"column {spec.column!r} (multi_hot with sep): expected strings, got {arr.type}")
            arr = pc.split_pattern(arr.cast(pa.string()), pattern=spec.sep)
        elif pa.types.is_null(arr.type):  # every value null (a request's, or a file's): no lists to read
            arr = pa.nulls(len(arr), pa.list_(pa.string()))
        elif not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
            raise DataError(f"column {spec.column!r} (multi_hot): expected a list column or set `sep`, got {arr.type}")
    elif isinstance(spec, NumericFeature):
        try:
            arr = pc.cast(arr, pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise DataError(f"column {spec.column!r} (numeric feature {spec.name!r}): {e}") from None
    return arr


def label_values(feats: FeaturesConfig, batch: Mapping[str, Any]) -> np.ndarray:
    """Labels as float32 0/1; raises DataError naming the column and the bad rows."""
    if feats.label not in batch:
        raise DataError(f"label column {feats.label!r} is missing from the input")
    arr = as_arrow(batch[feats.label], feats.label)
    if arr.null_count:
        raise DataError(f"label column {feats.label!r}: {arr.null_count} rows have a null label")
    try:
        x = pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise DataError(f"label column {feats.label!r}: cannot read {arr.type} as a number") from None
    if feats.label_threshold is not None:
        return (x >= feats.label_threshold).astype(np.float32)
    bad = ~((x == 0) | (x == 1))
    if bad.any():
        rows = np.flatnonzero(bad)
        raise DataError(f"label column {feats.label!r}: {bad.sum()} rows are not 0/1 "
                        f"(e.g. row {rows[0]} = {x[rows[0]]!r}); set features.label_threshold to binarize")
    return x.astype(np.float32)


def numeric_transform(x: np.ndarray, kind: str) -> np.ndarray:
    """`log1p` is sign-preserving so negative amounts stay finite."""
    return np.sign(x) * np.log1p(np.abs(x)) if kind == "log1p" else x


def stable_hash(arr: pa.Array) -> np.ndarray:
    """uint64 hash of each value's string form: the same in every process and in serving."""
    strings = pc.cast(arr, pa.string()) if not pa.types.is_string(arr.type) else arr
    return pd.util.hash_array(strings.fill_null("\x00null").to_numpy(zero_copy_only=False), hash_key=HASH_KEY)


@dataclass
class Preprocessor:
    """Fitted statistics for every feature; `transform` is pure and deterministic."""
    spec: FeaturesConfig
    vocab: dict[str, pa.Array] = field(default_factory=dict)  # categorical / multi-hot, by frequency
    mean: dict[str, float] = field(default_factory=dict)  # numeric, after the transform
    std: dict[str, float] = field(default_factory=dict)
    fill: dict[str, float] = field(default_factory=dict)  # numeric, in transformed units

    # ----- layout
    def cardinality(self, name: str) -> int:
        f = self._feature(name)
        if isinstance(f, CategoricalFeature) and f.hash_buckets:
            return FIRST + f.hash_buckets
        return FIRST + len(self.vocab[name])

    def _feature(self, name: str) -> Any:
        return next(f for f in self.spec.features if f.name == name)

    @property
    def cat_features(self) -> list[Any]:
        return [f for f in self.spec.features if not isinstance(f, NumericFeature)]

    @property
    def num_features(self) -> list[NumericFeature]:
        return [f for f in self.spec.features if isinstance(f, NumericFeature)]

    def slots(self, f: Any) -> list[str]:
        """Encoded column names of a categorical (1 slot) or multi-hot (max_len slots) feature."""
        return [f"{f.name}__{i}" for i in range(f.max_len)] if isinstance(f, MultiHotFeature) else [f.name]

    @property
    def cat_columns(self) -> list[str]:
        return [c for f in self.cat_features for c in self.slots(f)]

    @property
    def num_columns(self) -> list[str]:
        return [f.name for f in self.num_features]

    @property
    def input_columns(self) -> list[str]:
        """The raw columns a request or a data file must provide (besides label/group)."""
        return list(dict.fromkeys(f.column for f in self.spec.features))

    # ----- transform
    def _index(self, name: str) -> pd.Index:
        """A pandas Index per vocabulary: its hash table is built once and reused for every batch."""
        cache = self.__dict__.setdefault("_indexes", {})
        if name not in cache:
            cache[name] = pd.Index(self.vocab[name].to_numpy(zero_copy_only=False), dtype=object)
        return cache[name]

    def _lookup(self, f: Any, values: pa.Array) -> np.ndarray:
        nulls = values.is_null().to_numpy(zero_copy_only=False) if values.null_count else None
        if isinstance(f, CategoricalFeature) and f.hash_buckets:
            idx = FIRST + (stable_hash(values) % np.uint64(f.hash_buckets)).astype(np.int64)
        else:
            vt = self.vocab[f.name].type
            if values.type != vt:
                try:
                    values = pc.cast(values, vt)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    raise DataError(f"column {f.column!r} (feature {f.name!r}): cannot read {values.type} "
                                    f"values as the fitted {vt}") from None
            # look up each distinct value once: batches hold few distinct values, and Arrow strings
            # would otherwise be turned into Python objects row by row
            d = pc.dictionary_encode(values)
            pos = self._index(f.name).get_indexer(d.dictionary.to_numpy(zero_copy_only=False))
            idx = np.where(pos < 0, OOV, pos + FIRST)[d.indices.fill_null(0).to_numpy(zero_copy_only=False)] \
                if len(d.dictionary) else np.full(len(values), OOV)
        if nulls is not None:
            idx = np.where(nulls, OOV, idx)
        return idx.astype(np.int32)

    def standardize(self, f: NumericFeature, x: np.ndarray) -> np.ndarray:
        """Raw numbers (float64; nan/inf = missing) -> the model's units: filled, transformed, z-scored."""
        x = numeric_transform(np.where(np.isfinite(x), x, np.nan), f.transform)
        z = (np.where(np.isnan(x), self.fill[f.name], x) - self.mean[f.name]) / self.std[f.name]
        # a value ten thousand deviations out is scored as that edge: any finite number gives a finite score
        # (position=1e15 overflowed float32 inside the model), and training data never comes near it
        return np.clip(z, -Z_MAX, Z_MAX)

    def encode_feature(self, f: Any, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        arr = raw_values(f, batch)
        if isinstance(f, NumericFeature):
            x = arr.to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> nan
            return {f.name: self.standardize(f, x).astype(np.float32)}
        if isinstance(f, CategoricalFeature):
            return {f.name: self._lookup(f, arr)}
        lists = arr.fill_null(pa.scalar([], arr.type)) if arr.null_count else arr
        lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
        flat = self._lookup(f, pc.list_flatten(lists))
        rows = np.repeat(np.arange(len(lengths)), lengths)
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        pos = np.arange(len(flat)) - starts
        keep = pos < f.max_len  # longer lists are truncated to max_len
        out = np.full((len(lengths), f.max_len), PAD, np.int32)
        out[rows[keep], pos[keep]] = flat[keep]
        return {c: out[:, i] for i, c in enumerate(self.slots(f))}

    def transform(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Raw columns (numpy, lists or Arrow) -> encoded int32 slots and float32 numerics.
        Adds `__label__` (and `__group__`, `__oracle__`) when those columns are present."""
        out: dict[str, np.ndarray] = {}
        for f in self.spec.features:
            out.update(self.encode_feature(f, batch))
        if self.spec.label in batch:
            out[LABEL] = label_values(self.spec, batch)
        if self.spec.group and self.spec.group in batch:
            out[GROUP] = stable_hash(as_arrow(batch[self.spec.group], self.spec.group)).view(np.int64)
        if self.spec.oracle and self.spec.oracle in batch:
            out[ORACLE] = as_arrow(batch[self.spec.oracle], self.spec.oracle).to_numpy(zero_copy_only=False).astype(np.float32)
        return out

    def pack(self, enc: Mapping[str, Any] | pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """Encoded columns (numpy, or Arrow as read from the encoded shards) -> (x_cat int32 [B, S],
        x_num float32 [B, N]) in the model's slot order."""
        cat = [_numpy(enc[c]) for c in self.cat_columns]
        num = [_numpy(enc[c]) for c in self.num_columns]
        n = len(cat[0]) if cat else len(num[0]) if num else 0
        return (np.stack(cat, axis=1) if cat else np.zeros((n, 0), np.int32),
                np.stack(num, axis=1) if num else np.zeros((n, 0), np.float32))

    # ----- plain-file persistence (JSON; vocab values keep their Arrow type)
    def to_json(self) -> str:
        return json.dumps({
            "format": "rankray.preprocessor/1",
            "spec": self.spec.model_dump(mode="json"),
            "vocab": {k: {"type": str(v.type), "values": v.to_pylist()} for k, v in self.vocab.items()},
            "mean": self.mean, "std": self.std, "fill": self.fill,
        })

    @classmethod
    def from_json(cls, text: str) -> Preprocessor:
        d = json.loads(text)
        if d.get("format") != "rankray.preprocessor/1":
            raise ValueError(f"not a rankray preprocessor file (format={d.get('format')!r})")
        vocab = {k: pa.array(v["values"], pa.type_for_alias(v["type"])) for k, v in d["vocab"].items()}
        return cls(FeaturesConfig.model_validate(d["spec"]), vocab, d["mean"], d["std"], d["fill"])
