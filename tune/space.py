"""`tune.search_space` from the config -> a conditional space Optuna samples define-by-run, checked before
any trial starts.

Keys are config paths (`train.lr`, `model.embedding_dim`, `model.mlp`, ...); values are one of
`{loguniform: [a, b]}`, `{uniform: [a, b]}`, `{int: [a, b]}` (both ends included) or
`{choice: [...]}`. Only `model.*` and `train.*` keys can be searched: the data and features are
prepared once per search, and the resources of a trial are fixed so trials never starve Ray Data.

The space spans model families: `model.name` may itself be searched (`{choice: [dcnv2, lightgbm]}`), and
each key belongs to a family: `model.num_leaves`, `model.min_data_in_leaf`, `model.gbdt_learning_rate` and
`model.num_boost_round` to `lightgbm`; every other `model.*` and `train.*` key (but `train.seed`) to the
deep models, of which `model.cross_layers`, `model.cross_rank` and `model.numeric_embedding` are dcnv2's
only, and logreg samples no `model.*` key. A trial samples `model.name` first, then only the keys its
model uses (`uses`): a LightGBM trial never draws a learning rate it would ignore, and TPE models each
model apart (`group=True`).
"""
from __future__ import annotations

import json
import math
from typing import Any

from training.config import Config, ConfigError, config_with

KINDS = ("loguniform", "uniform", "int", "choice")
GBDT = "lightgbm"
GBDT_KEYS = frozenset({"model.num_leaves", "model.min_data_in_leaf", "model.gbdt_learning_rate",
                       "model.num_boost_round"})
SHARED_KEYS = frozenset({"model.name", "train.seed"})
DCNV2_KEYS = frozenset({"model.cross_layers", "model.cross_rank", "model.numeric_embedding"})
# used when tune.search_space is empty: both families, with the knobs that matter most for each
DEFAULT_SPACE: dict[str, dict[str, Any]] = {"model.name": {"choice": ["dcnv2", GBDT, "logreg"]},
                                            "train.lr": {"loguniform": [0.001, 0.01]},
                                            "model.embedding_dim": {"choice": [8, 16, 32]},
                                            "model.cross_layers": {"int": [1, 3]},
                                            "model.numeric_embedding": {"choice": ["none", "periodic"]},
                                            "model.dropout": {"choice": [0.0, 0.1, 0.3]},
                                            "train.weight_decay": {"choice": [0.0, 0.01, 0.1]},
                                            "model.num_leaves": {"choice": [7, 15, 31, 63, 127, 255]},
                                            "model.min_data_in_leaf": {"choice": [20, 50, 100]},
                                            "model.gbdt_learning_rate": {"loguniform": [0.02, 0.1]}}
# ... and its first three trials: each model at its defaults (TPE's random start then explores around them).
# logreg is cheap and errs unlike the others: a linear part the winner's ensemble can take (on a drifting
# time split it generalises best of all)
_DEEP_DEFAULTS = {"train.lr": 0.005, "model.embedding_dim": 16, "model.cross_layers": 3,
                  "model.numeric_embedding": "none", "model.dropout": 0.0, "train.weight_decay": 0.0}
DEFAULT_START: list[dict[str, Any]] = [
    {"model.name": GBDT, "model.num_leaves": 63, "model.min_data_in_leaf": 50, "model.gbdt_learning_rate": 0.05},
    {"model.name": "dcnv2", **_DEEP_DEFAULTS},
    {"model.name": "logreg", "train.lr": _DEEP_DEFAULTS["train.lr"], "train.weight_decay": 0.0}]
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


def family(key: str) -> str | None:
    """`lightgbm` or `deep`: the model family a key belongs to (None: every trial samples it)."""
    return None if key in SHARED_KEYS else GBDT if key in GBDT_KEYS else "deep"


def _family_of(name: str) -> str:
    return GBDT if name == GBDT else "deep"


def uses(name: str, key: str) -> bool:
    """Whether a trial of model `name` samples `key`: its family's keys, less what the model has no use for
    (dcnv2's own keys elsewhere; logreg has no model.* knob: its learning rate and weight decay are train.*)."""
    if family(key) not in (None, _family_of(name)):
        return False
    if key in DCNV2_KEYS:
        return name == "dcnv2"
    return not (name == "logreg" and key.startswith("model.") and key not in SHARED_KEYS)


def model_names(cfg: Config) -> list[str]:
    """The model names a trial may have: `model.name`'s choices when it is searched, else the config's."""
    spec = search_space(cfg).get("model.name")
    if spec is None:
        return [cfg.model.name]
    if not (isinstance(spec, dict) and isinstance(spec.get("choice"), list) and len(spec) == 1):
        raise ConfigError(f"{_where('model.name')}: the model is searched as {{choice: [...]}}, got {spec!r}")
    return list(spec["choice"])


def keys_for(cfg: Config, name: str) -> list[str]:
    """The keys of the space a trial of model `name` samples."""
    return [k for k in search_space(cfg) if uses(name, k)]


class Space:
    """The checked space as Optuna's define-by-run function (picklable, so a restored search has it):
    `model.name` first, then that family's keys. Choice values are encoded (`_scalar`)."""

    def __init__(self, specs: dict[str, tuple[str, Any]], base_name: str) -> None:
        self.specs, self.base_name = specs, base_name

    def __call__(self, trial: Any) -> None:
        name = self._suggest(trial, "model.name") if "model.name" in self.specs else self.base_name
        for key in self.specs:
            if key != "model.name" and uses(name, key):
                self._suggest(trial, key)

    def _suggest(self, trial: Any, key: str) -> Any:
        kind, arg = self.specs[key]
        if kind == "choice":
            return trial.suggest_categorical(key, arg)
        if kind == "int":
            return trial.suggest_int(key, *arg)
        return trial.suggest_float(key, *arg, log=kind == "loguniform")


def start_points(cfg: Config) -> list[dict[str, Any]]:
    """`tune.start_points` (with the default space and none given: DEFAULT_START), encoded as the sampled
    values are: the searcher's first trials. Each point gives `model.name` when it is searched and every key
    of that model's family in the space, inside its range or among its choices."""
    space, out = search_space(cfg), []
    points = cfg.tune.start_points or ([] if cfg.tune.search_space else DEFAULT_START)
    for i, point in enumerate(points):
        where = f"tune.start_points.{i}"
        want = set(keys_for(cfg, point.get("model.name", cfg.model.name)))
        missing, extra = sorted(want - set(point)), sorted(set(point) - want)
        if missing or extra:
            raise ConfigError(f"{where}: a start point gives every key of the search space that its model uses "
                              f"(model.name's family) and no other (missing: {missing}, not used: {extra})")
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


def parse_space(cfg: Config) -> Space:
    """The search space, checked (every key, every end of a range, every choice, the families against the
    model names, `tune.start_points`). Raises ConfigError naming the key."""
    space = search_space(cfg)
    names = model_names(cfg)
    specs: dict[str, tuple[str, Any]] = {}
    for key, spec in space.items():
        _check_key(cfg, key)
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in KINDS):
            raise ConfigError(f"{_where(key)}: expected one of {{{', '.join(k + ': ...' for k in KINDS)}}}, "
                              f"got {spec!r}")
        fam = family(key)
        if not any(uses(n, key) for n in names):
            what = "a lightgbm parameter" if fam == GBDT else "a dcnv2 parameter" if key in DCNV2_KEYS else \
                "a deep-model parameter (lightgbm does not use it)"
            raise ConfigError(f"{_where(key)}: {key} is {what}, and no trial trains such a model "
                              f"(model.name: {' or '.join(names)}); search model.name too, or drop {key}")
        kind, arg = next(iter(spec.items()))
        if kind == "choice":
            if not isinstance(arg, list) or not arg:
                raise ConfigError(f"{_where(key)}: choice needs a non-empty list, got {arg!r}")
            for v in arg:
                _check_value(cfg, key, v)
            # Optuna's categorical values must be scalars: lists (model.mlp) travel as JSON text
            specs[key] = (kind, [v if _scalar(v) else JSON + json.dumps(v) for v in arg])
            continue
        lo, hi = _bounds(key, kind, arg)
        if kind == "int":
            lo, hi = int(lo), int(hi)
        for v in (lo, hi):
            _check_value(cfg, key, v)
        specs[key] = (kind, [lo, hi])
    start_points(cfg)
    return Space(specs, cfg.model.name)


def trial_params(cfg: Config, config: dict[str, Any] | None) -> dict[str, Any]:
    """A trial's sampled values (its family's keys of the space), as plain Python values (lists decoded)."""
    return {k: _plain(config[k]) for k in search_space(cfg) if k in (config or {})}


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
