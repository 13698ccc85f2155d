"""The request schema, derived from the bundle's feature spec: raw JSON in, validated columns out.

Every field a feature reads (`Preprocessor.input_columns`) must be present in the request; `null` is
accepted and encoded as in training (out-of-vocabulary index, or the fitted fill value). Errors name
the field as `rows[3].budget: missing`, and are raised as `RequestError` with an HTTP status. In /rank, a
field may come once in `context` for every candidate; one given neither there nor in a candidate is null,
and the response names it (`absent`). The OpenAPI schema of both bodies is built here from the same
columns (`rank_body`, `predict_body`): what it admits, validation admits, and the other way round.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, Field

from training.config import CategoricalFeature, MultiHotFeature
from training.features import Preprocessor

MISSING = object()
INT64 = (-(2**63), 2**63 - 1)
MAX_FLOAT = 1.7976931348623157e308  # an integer beyond it has no float value
MAX_ERRORS = 5  # per response: enough to fix a client, short enough to read


class RequestError(Exception):
    """A request the service refuses; `status` is the HTTP status, the message names the field."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class NonFinite(str):
    """JSON's NaN / Infinity / -Infinity, kept as a marker so the error can name the field."""


def parse_json(body: bytes) -> Any:
    """Strict JSON: NaN and Infinity survive only as `NonFinite` markers, never as floats."""
    try:
        return json.loads(body, parse_constant=NonFinite)
    except RecursionError:
        raise RequestError(400, "body: invalid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise RequestError(400, f"body: invalid JSON ({e})") from None


@dataclass(frozen=True)
class Column:
    """One request field and how the features that read it constrain its values."""
    name: str
    kinds: frozenset[str]  # numeric | categorical | multi_hot | text (read through a regex)
    sep: str | None = None  # multi_hot: lists are joined with it, as training data stores them
    vocab: str = ""  # the fitted values' type (int, float, bool, string; "" = none fitted): mixed values go to it

    @property
    def float_ok(self) -> bool:  # a categorical fitted on floats
        return self.vocab == "float"

    @property
    def ok_types(self) -> frozenset[type]:
        """Value types that pass every kind's check without a closer look (lists get one)."""
        allowed = {int, float, str, bool, list, type(None)}
        for kind in self.kinds:
            if kind == "numeric":
                allowed &= {int, float, type(None)}
            elif kind in ("categorical", "text"):
                allowed &= {str, int, bool, type(None)} | ({float} if self.float_ok else set())
            else:
                allowed &= {str, int, list, type(None)}
        return frozenset(allowed)


def _columns(pp: Preprocessor) -> list[Column]:
    by_col: dict[str, list[Any]] = {}
    for f in pp.spec.features:
        by_col.setdefault(f.column, []).append(f)
    out = []
    for name, feats in by_col.items():
        kinds = frozenset("text" if f.regex else f.type for f in feats)
        sep = next((f.sep for f in feats if isinstance(f, MultiHotFeature) and not f.regex), None)
        vtypes = [pp.vocab[f.name].type for f in feats if isinstance(f, (CategoricalFeature, MultiHotFeature))
                  and not f.regex and not (isinstance(f, MultiHotFeature) and f.sep) and f.name in pp.vocab]
        vocab = "" if not vtypes else "int" if all(map(pa.types.is_integer, vtypes)) else \
            "float" if any(map(pa.types.is_floating, vtypes)) else "bool" if all(map(pa.types.is_boolean, vtypes)) \
            else "string"
        out.append(Column(name, kinds, sep, vocab))
    return out


def _type_name(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", float: "a number",
            int: "an integer"}.get(type(v), type(v).__name__)


def _value_error(col: Column, v: Any) -> str | None:
    """Why `v` cannot be a value of `col` (None when it can)."""
    if v is None:
        return None
    if isinstance(v, NonFinite):
        return f"must be a finite number (got {v})" if "numeric" in col.kinds else f"invalid value {v}"
    t = type(v)
    if t is int and not INT64[0] <= v <= INT64[1]:
        if float not in col.ok_types:  # an id: it must fit the 64-bit integers it is stored as
            return "integer out of the 64-bit range"
        if abs(v) > MAX_FLOAT:
            return f"must be a finite number (got an integer of {len(str(abs(v)))} digits)"
    for kind in col.kinds:
        if kind == "numeric":
            if t is float and not math.isfinite(v):
                return f"must be a finite number (got {v})"
            if t not in (int, float):
                return f"must be a number, got {_type_name(v)}"
        elif kind in ("categorical", "text"):
            if t not in (str, int, bool) and not (t is float and col.float_ok):
                return f"must be a string, integer or boolean, got {_type_name(v)}"
        elif t is list:  # multi_hot; a null item is out of vocabulary, as a null inside a Parquet list
            bad = next((x for x in v if type(x) not in (str, int, type(None))), MISSING)
            if bad is not MISSING:
                return f"list items must be strings, integers or null, got {_type_name(bad)}"
            if any(type(x) is int and not INT64[0] <= x <= INT64[1] for x in v):
                return "list item integer out of the 64-bit range"
        elif t not in (str, int):
            return f"must be a list of strings or integers, or a string, got {_type_name(v)}"
    return None


def _all_valid(col: Column, ok: frozenset[type], values: list[Any]) -> bool:
    """Fast check of a whole column in C-level passes; False sends the caller to the per-value check."""
    types = set(map(type, values))
    if not types <= ok:
        return False
    if int in types:
        ints = [v for v in values if type(v) is int]
        if min(ints) < INT64[0] or max(ints) > INT64[1]:
            return False
    if float in types and "numeric" in col.kinds and not all(map(math.isfinite, [v for v in values if type(v) is float])):
        return False
    if list in types:
        return all(_value_error(col, v) is None for v in values if type(v) is list)
    return True


def _normalize(col: Column, values: list[Any]) -> list[Any]:
    """Bring valid values to the form training data had, so `Preprocessor.transform` reads them alike."""
    if col.kinds == frozenset({"multi_hot"}):
        if col.sep is not None:
            return [col.sep.join(str(x) for x in v if x is not None) if type(v) is list
                    else (str(v) if type(v) is int else v) for v in values]
        lists = [v if type(v) is list or v is None else [v] for v in values]
        if _mixed({type(x) for v in lists if v for x in v}, col.vocab):
            lists = [[_as(col.vocab, x) for x in v] if v else v for v in lists]
        return lists
    if col.kinds <= {"categorical", "text"} and _mixed(set(map(type, values)), col.vocab):
        return [_as(col.vocab, v) for v in values]
    if float in col.ok_types and any(type(v) is int and not INT64[0] <= v <= INT64[1] for v in values):
        return [float(v) if type(v) is int else v for v in values]  # a number past int64: a float column
    return values


def _whole(v: Any) -> Any:
    return int(v) if type(v) is float and v.is_integer() else v


def _integral(values: list[Any]) -> list[Any]:
    """JSON has one number type: 3.0 is the integer 3 (as JSON Schema's "integer" says) where a float is not a
    value; a list's items too."""
    if not any(type(v) in (float, list) for v in values):
        return values
    return [[_whole(x) for x in v] if type(v) is list else _whole(v) for v in values]


def _mixed(types: set[type], vocab: str) -> bool:
    """Values Arrow cannot read as one column of the fitted type: several types, or text for numbers."""
    types = types - {type(None)}
    return len(types) > 1 or (str in types and vocab in ("int", "float"))


def _as(vocab: str, v: Any) -> Any:
    """A valid value in the type of the fitted vocabulary; one it cannot be is null (out of vocabulary)."""
    t = type(v)
    if v is None or (vocab == "int" and t is int) or (vocab == "float" and t is float):
        return v
    if vocab == "int":
        return _as_int(v) if t is str else None
    if vocab == "float":
        f = float(v) if t is int else _as_float(v) if t is str else None
        return f if f is not None and math.isfinite(f) else None
    if vocab == "bool":
        return v if t is bool else None
    return ("true" if v else "false") if t is bool else str(v)  # text, as Arrow casts a bool or a number


def _as_float(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


def _as_int(s: str) -> int | None:
    try:
        i = int(s)
    except ValueError:
        return None  # text never seen by an integer vocabulary: out of vocabulary
    return i if INT64[0] <= i <= INT64[1] else None


def _about(f: Any) -> str:
    if f.regex:
        return f"{f.type} (read through the pattern {f.regex!r})"
    if isinstance(f, MultiHotFeature):
        return "multi_hot: a list of strings or integers" + (f", or one string joined with {f.sep!r}" if f.sep else "")
    return f.type + (f" ({f.transform})" if getattr(f, "transform", "none") != "none" else "")


class Schema:
    """Validates /rank and /predict bodies against a preprocessor's input columns."""

    def __init__(self, pp: Preprocessor, max_items: int) -> None:
        self.columns = _columns(pp)
        self._about = {c.name: ", ".join(f"{f.name}: {_about(f)}" for f in pp.spec.features if f.column == c.name)
                       for c in self.columns}
        self._ok = {c.name: c.ok_types for c in self.columns}
        self.max_items = max_items

    @property
    def fields(self) -> list[str]:
        return [c.name for c in self.columns]

    def _items(self, body: dict[str, Any], key: str) -> list[Any]:
        items = body.get(key, MISSING)
        if items is MISSING:
            raise RequestError(422, f"{key}: missing")
        if type(items) is not list:
            raise RequestError(422, f"{key}: must be a list of objects, got {_type_name(items)}")
        if not items:
            raise RequestError(422, f"{key}: must not be empty")
        if len(items) > self.max_items:
            raise RequestError(422, f"{key}: {len(items)} items, more than the limit of {self.max_items}")
        bad = next((i for i, x in enumerate(items) if type(x) is not dict), None)
        if bad is not None:
            raise RequestError(422, f"{key}[{bad}]: must be an object, got {_type_name(items[bad])}")
        return items

    def columns_of(self, items: list[dict[str, Any]], key: str, context: dict[str, Any] | None = None,
                   absent: list[str] | None = None) -> dict[str, list[Any]]:
        """Validated column lists; an item's own value wins over the context's. With `absent` (a list), a field an
        item lacks is null, and its name is added there; without it, a lacking field is an error."""
        context = context or {}
        errors: list[str] = []
        out: dict[str, list[Any]] = {}
        n = len(items)
        for col in self.columns:
            c = col.name
            own = [x.get(c, MISSING) for x in items]
            shared = context.get(c, MISSING)
            if shared is not MISSING:
                shared = shared if float in self._ok[c] else _integral([shared])[0]
                why = _value_error(col, shared)
                if why:
                    errors.append(f"context.{c}: {why}")
                    continue
                if all(v is MISSING for v in own):
                    out[c] = _normalize(col, [shared] * n)
                    continue
                own = [shared if v is MISSING else v for v in own]
            if float not in self._ok[c]:
                own = _integral(own)
            if absent is not None and any(v is MISSING for v in own):
                absent.append(c)
                own = [None if v is MISSING else v for v in own]
            if _all_valid(col, self._ok[c], own):
                out[c] = _normalize(col, own)
                continue
            for i, v in enumerate(own):
                why = "missing" if v is MISSING else _value_error(col, v)
                if why:
                    errors.append(f"{key}[{i}].{c}: {why}")
                    break  # one error per field keeps the message short
            else:
                out[c] = _normalize(col, own)
        if errors:
            more = f" (and {len(errors) - MAX_ERRORS} more)" if len(errors) > MAX_ERRORS else ""
            raise RequestError(422, "; ".join(errors[:MAX_ERRORS]) + more)
        return out

    def value_schema(self, col: Column) -> dict[str, Any]:
        """The JSON Schema of one field: exactly what `_value_error` lets through (null always)."""
        ok = col.ok_types
        types = [n for t, n in ((str, "string"), (bool, "boolean"), (float, "number"), (list, "array"),
                                (type(None), "null")) if t in ok]
        if int in ok and float not in ok:
            types.insert(0, "integer")
        out: dict[str, Any] = {"type": types, "description": self._about[col.name]}
        if "number" in types or "integer" in types:  # bounds apply to numbers only
            out.update(zip(("minimum", "maximum"), (-MAX_FLOAT, MAX_FLOAT) if float in ok else INT64))
        if list in ok:
            out["items"] = {"type": ["string", "integer", "null"], "minimum": INT64[0], "maximum": INT64[1]}
        return out

    def _items_schema(self, required: bool) -> dict[str, Any]:
        props = {c.name: self.value_schema(c) for c in self.columns}
        return {"type": "object", "properties": props, **({"required": self.fields} if required else {})}

    def _list_schema(self, items: dict[str, Any], what: str) -> dict[str, Any]:
        return {"type": "array", "minItems": 1, "maxItems": self.max_items, "items": items, "description": what}

    def rank_body(self) -> dict[str, Any]:
        """The /rank body's JSON Schema: every field optional (absent = null), typed."""
        items = self._items_schema(required=False)
        items["properties"] = {"id": {"type": ["string", "integer", "null"],
                                      "description": "echoed back in the results"}, **items["properties"]}
        return {"type": "object", "required": ["candidates"], "properties": {
            "context": {**self._items_schema(required=False), "type": ["object", "null"],
                        "description": "fields shared by every candidate (a candidate's own value wins)"},
            "candidates": self._list_schema(items, "one object per item; a field neither here nor in context is "
                                                   "null (named in the response's `absent`)"),
            "top_k": {"type": ["integer", "null"], "minimum": 1, "description": "how many results (default: all)"}}}

    def predict_body(self) -> dict[str, Any]:
        return {"type": "object", "required": ["rows"],
                "properties": {"rows": self._list_schema(self._items_schema(required=True), "rows to score, in order")}}

    def rank_request(self, body: Any) -> tuple[dict[str, list[Any]], list[Any], int, list[str]]:
        """(columns, candidate ids, top_k, fields absent from the context and some candidate) of a /rank body.
        An absent field is null, like an explicit null: a field shared by the candidates may come once in the
        context, and the published schema can say exactly that (a per-field "here or there" rule cannot be
        written as a JSON Schema that schema-driven clients and fuzzers can use: 2^fields branches)."""
        if type(body) is not dict:
            raise RequestError(422, f"body: must be a JSON object, got {_type_name(body)}")
        context = body.get("context", {})
        if context is None:
            context = {}
        if type(context) is not dict:
            raise RequestError(422, f"context: must be an object, got {_type_name(context)}")
        items = self._items(body, "candidates")
        top_k = body.get("top_k")
        top_k = len(items) if top_k is None else _whole(top_k)
        if type(top_k) is not int or top_k < 1:
            raise RequestError(422, f"top_k: must be an integer >= 1, got {top_k!r}")
        ids = [x.get("id") for x in items]
        bad = next((i for i, v in enumerate(ids) if v is not None and type(v) not in (str, int)), None)
        if bad is not None:
            raise RequestError(422, f"candidates[{bad}].id: must be a string or an integer, got {_type_name(ids[bad])}")
        absent: list[str] = []
        columns = self.columns_of(items, "candidates", context, absent)
        return columns, ids, min(top_k, len(items)), absent

    def predict_request(self, body: Any) -> dict[str, list[Any]]:
        if type(body) is not dict:
            raise RequestError(422, f"body: must be a JSON object, got {_type_name(body)}")
        return self.columns_of(self._items(body, "rows"), "rows")


# ---- documentation only: the routes read raw bytes (see `Schema`), these models feed the OpenAPI page
class RankRequest(BaseModel):
    context: dict[str, Any] = Field(default_factory=dict, description="fields shared by every candidate")
    candidates: list[dict[str, Any]] = Field(description="one object per item; its fields win over context's; "
                                                         "optional `id` is echoed back")
    top_k: int | None = Field(default=None, ge=1, description="how many results (default: all)")


class RankResult(BaseModel):
    index: int
    id: str | int | None
    score: float


class RankResponse(BaseModel):
    model_version: str
    results: list[RankResult]
    absent: list[str] = Field(default_factory=list, description="fields missing from the context and some "
                                                                 "candidate, scored as null (only when any)")


class PredictRequest(BaseModel):
    rows: list[dict[str, Any]]


class PredictResponse(BaseModel):
    model_version: str
    scores: list[float]


class ErrorResponse(BaseModel):
    detail: str
