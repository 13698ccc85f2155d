"""`tune.search_space` from the config -> Ray Tune domains, checked before any trial starts.

Keys are config paths (`train.lr`, `model.embedding_dim`, `model.mlp`, ...); values are one of
`{loguniform: [a, b]}`, `{uniform: [a, b]}`, `{int: [a, b]}` (both ends included) or
`{choice: [...]}`. Only `model.*` and `train.*` keys can be searched: the data and features are
prepared once per search, and the resources of a trial are fixed so trials never starve Ray Data.
"""
from __future__ import annotations

import json
import math
from typing import Any

from ray import tune

from training.config import Config, ConfigError, config_with

KINDS = ("loguniform", "uniform", "int", "choice")
# used when tune.search_space is empty: the knobs that matter most for the default dcnv2
DEFAULT_SPACE: dict[str, dict[str, Any]] = {"train.lr": {"loguniform": [0.001, 0.01]},
                                            "model.embedding_dim": {"choice": [8, 16, 32]},
                                            "model.cross_layers": {"int": [1, 3]}}
# fixed for the whole search: resources, storage and the trial's own bookkeeping
FIXED = {"train.num_workers", "train.cpus_per_worker", "train.data_cpus", "train.torch_threads", "train.use_gpu",
         "train.storage_path", "train.max_failures", "train.log_every"}


def _where(key: str) -> str:
    return f"tune.search_space.{key}"


def _bounds(key: str, kind: str, spec: Any) -> tuple[float, float]:
    if not (isinstance(spec, list) and len(spec) == 2 and all(_number(v) for v in spec)):
        raise ConfigError(f"{_where(key)}: {kind} needs [low, high] numbers, got {spec!r}")
    lo, hi = spec
    if kind == "int" and not all(float(v).is_integer() for v in spec):
        raise ConfigError(f"{_where(key)}: int needs whole-number bounds, got {spec!r}")
    if not lo < hi and not (kind == "int" and lo == hi):
        raise ConfigError(f"{_where(key)}: low must be below high, got {spec!r}")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{_where(key)}: loguniform needs low > 0, got {spec!r}")
    return lo, hi


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_key(cfg: Config, key: str) -> None:
    section, _, rest = key.partition(".")
    if section not in ("model", "train") or not rest:
        raise ConfigError(f"{_where(key)}: only model.* and train.* keys can be searched "
                          "(data and features are prepared once per search)")
    if key in FIXED:
        raise ConfigError(f"{_where(key)}: {key} is fixed for a search (trial resources and storage); "
                          "set it in the config instead")
    node: Any = cfg.model_dump()
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"{_where(key)}: {key} is not a config key")
        node = node[part]


def _check_value(cfg: Config, key: str, value: Any) -> None:
    """The config must accept every end of the range / every choice: fail now, not in trial 7."""
    try:
        config_with(cfg, {key: value})
    except ConfigError as e:
        detail = str(e).split("\n", 1)[-1].strip()
        raise ConfigError(f"{_where(key)}: value {value!r} is not valid for {key}: {detail}") from None


def search_space(cfg: Config) -> dict[str, dict[str, Any]]:
    """The configured space, or DEFAULT_SPACE when none is given."""
    return cfg.tune.search_space or DEFAULT_SPACE


def start_points(cfg: Config) -> list[dict[str, Any]]:
    """`tune.start_points`, encoded as the sampled values are: the searcher's first trials. Each point
    gives every key of the search space, inside its range or among its choices."""
    space, out = search_space(cfg), []
    for i, point in enumerate(cfg.tune.start_points):
        where = f"tune.start_points.{i}"
        missing, extra = sorted(set(space) - set(point)), sorted(set(point) - set(space))
        if missing or extra:
            raise ConfigError(f"{where}: a start point gives every key of the search space and no other "
                              f"(missing: {missing}, not in the space: {extra})")
        enc = {}
        for key, v in point.items():
            kind, arg = next(iter(space[key].items()))
            inside = v in arg if kind == "choice" else (
                _number(v) and arg[0] <= v <= arg[1] and (kind != "int" or float(v).is_integer()))
            if not inside:
                raise ConfigError(f"{where}.{key}: {v!r} is outside {_where(key)} ({kind}: {arg!r})")
            enc[key] = (v if _scalar(v) else JSON + json.dumps(v)) if kind == "choice" else \
                int(v) if kind == "int" else float(v)
        out.append(enc)
    return out


def parse_space(cfg: Config) -> dict[str, Any]:
    """The search space as Ray Tune domains, keyed by config path, with `tune.start_points` checked
    against it. Raises ConfigError naming the key."""
    space = search_space(cfg)
    if cfg.model.name == "lightgbm" or "lightgbm" in (space.get("model.name", {}).get("choice") or []):
        raise ConfigError("model.name: lightgbm is trained by `rankray train`; `rankray tune` and the pipeline "
                          "search the deep models only (searching lightgbm is not built yet)")
    out: dict[str, Any] = {}
    for key, spec in space.items():
        _check_key(cfg, key)
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in KINDS):
            raise ConfigError(f"{_where(key)}: expected one of {{{', '.join(k + ': ...' for k in KINDS)}}}, "
                              f"got {spec!r}")
        kind, arg = next(iter(spec.items()))
        if kind == "choice":
            if not isinstance(arg, list) or not arg:
                raise ConfigError(f"{_where(key)}: choice needs a non-empty list, got {arg!r}")
            for v in arg:
                _check_value(cfg, key, v)
            # Optuna's categorical values must be scalars: lists (model.mlp) travel as JSON text
            out[key] = tune.choice([v if _scalar(v) else JSON + json.dumps(v) for v in arg])
            continue
        lo, hi = _bounds(key, kind, arg)
        if kind == "int":
            lo, hi = int(lo), int(hi)
        for v in (lo, hi):
            _check_value(cfg, key, v)
        out[key] = {"loguniform": tune.loguniform, "uniform": tune.uniform}[kind](lo, hi) if kind != "int" \
            else tune.randint(lo, hi + 1)
    start_points(cfg)
    return out


def trial_params(cfg: Config, config: dict[str, Any] | None) -> dict[str, Any]:
    """A trial's sampled values for the search-space keys, as plain Python values (lists decoded)."""
    return {k: _plain((config or {}).get(k)) for k in search_space(cfg)}


def trial_config(cfg: Config, params: dict[str, Any]) -> Config:
    """The base config with one trial's sampled values applied."""
    return config_with(cfg, {k: _plain(v) for k, v in params.items()})


JSON = "json:"


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float)) or (isinstance(v, str) and not v.startswith(JSON))


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):  # numpy scalars from samplers
        return v.item()
    if isinstance(v, str) and v.startswith(JSON):
        return json.loads(v[len(JSON):])
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v
