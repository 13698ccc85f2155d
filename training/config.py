"""The one typed config tree: YAML in, `--set a.b=value` overrides, key paths in every error."""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config that cannot run. The message names the key path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------- feature spec
class _FeatureBase(_Strict):
    name: str = Field(min_length=1)
    source: str | None = None  # read from this column instead of `name`
    regex: str | None = None  # keep the first capture group of `source` (derived features)

    @property
    def column(self) -> str:
        return self.source or self.name


class CategoricalFeature(_FeatureBase):
    type: Literal["categorical"]
    min_count: int = Field(default=1, ge=1)
    max_vocab: int | None = Field(default=None, ge=1)
    hash_buckets: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _hash_xor_vocab(self) -> CategoricalFeature:
        if self.hash_buckets is not None and (self.max_vocab is not None or self.min_count != 1):
            raise ValueError("hash_buckets cannot be combined with min_count or max_vocab")
        return self


class NumericFeature(_FeatureBase):
    type: Literal["numeric"]
    transform: Literal["none", "log1p"] = "none"
    fill: float | None = None  # value for nulls before the transform; None = the fitted mean
    # A history feature made in `prepare`: per row, how many rows with the same value of this column
    # came strictly earlier (features.time), over all splits. Serving takes it from the request by `name`.
    count_by: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _count_is_derived(self) -> NumericFeature:
        if self.count_by is not None and (self.source is not None or self.regex is not None):
            raise ValueError(f"feature {self.name!r}: count_by makes the column itself; it cannot have source or regex")
        return self


class MultiHotFeature(_FeatureBase):
    type: Literal["multi_hot"]
    sep: str | None = None  # None: the column is a list; else split the string on `sep`
    max_len: int = Field(default=8, ge=1)
    min_count: int = Field(default=1, ge=1)
    max_vocab: int | None = Field(default=None, ge=1)


Feature = Annotated[Union[CategoricalFeature, NumericFeature, MultiHotFeature], Field(discriminator="type")]


class FeaturesConfig(_Strict):
    label: str
    label_threshold: float | None = None  # label = column >= threshold (e.g. rating >= 4)
    group: str | None = None
    time: str | None = None
    oracle: str | None = None  # true-probability column of synthetic data: reported as bayes_auc, never a feature
    features: list[Feature] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> FeaturesConfig:
        names = [f.name for f in self.features]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate feature names: {dup}")
        if self.label in names:
            raise ValueError(f"label column {self.label!r} is also listed as a feature")
        for f in self.count_features:
            if not self.time:
                raise ValueError(f"feature {f.name!r}: count_by counts earlier rows, so features.time must be set")
        return self

    @property
    def count_features(self) -> list[NumericFeature]:
        return [f for f in self.features if isinstance(f, NumericFeature) and f.count_by is not None]


# ---------------------------------------------------------------- data
class JoinConfig(_Strict):
    path: str
    on: str
    columns: list[str] | None = None


class SplitConfig(_Strict):
    kind: Literal["random", "time", "given"] = "random"
    valid_fraction: float = Field(default=0.1, gt=0, lt=0.5)
    test_fraction: float = Field(default=0.1, gt=0, lt=0.5)
    seed: int = 0


class GenerateConfig(_Strict):
    rows: int = Field(ge=1000)
    seed: int = 0
    shards: int = Field(default=8, ge=1)


class S3Config(_Strict):
    endpoint_url: str | None = None  # default: AWS_ENDPOINT_URL
    region: str | None = None  # default: AWS_REGION / AWS_DEFAULT_REGION


class DataConfig(_Strict):
    source: str | None = None  # file, directory or glob; local or s3://
    train: str | None = None  # for split.kind == given
    valid: str | None = None
    test: str | None = None
    format: Literal["auto", "parquet", "csv"] = "auto"
    joins: list[JoinConfig] = Field(default_factory=list)
    split: SplitConfig = Field(default_factory=SplitConfig)
    generate: GenerateConfig | None = None  # make `source` with the synthetic generator if missing
    s3: S3Config = Field(default_factory=S3Config)
    batch_size: int = Field(default=8192, ge=1)
    materialize: Literal["auto"] | bool = "auto"  # keep encoded splits in the object store
    # rows whose label is null or not 0/1: `error` stops with the count and the column; `quarantine`
    # counts them, writes them to RUN_DIR/data/quarantine/*.parquet and prepares the other rows
    bad_rows: Literal["error", "quarantine"] = "error"

    @model_validator(mode="after")
    def _sources(self) -> DataConfig:
        given = [self.train, self.valid, self.test]
        if self.split.kind == "given":
            if not all(given):
                raise ValueError("split.kind 'given' needs data.train, data.valid and data.test")
        elif not self.source:
            raise ValueError("data.source is required unless split.kind is 'given'")
        return self


# ---------------------------------------------------------------- model / train / tune / serve
class ModelConfig(_Strict):
    name: Literal["dcnv2", "dlrm", "deepfm", "wide_deep", "logreg", "lightgbm"] = "dcnv2"
    embedding_dim: int = Field(default=16, ge=1)
    mlp: list[int] = Field(default_factory=lambda: [256, 128])
    cross_layers: int = Field(default=3, ge=0)
    cross_rank: int | None = Field(default=None, ge=1)  # low-rank cross (DCN-Mix style) when set
    dropout: float = Field(default=0.0, ge=0, lt=1)
    # dcnv2 only (deepfm, wide_deep and logreg always have one; dlrm has none): logreg's per-value weights
    # added to the logit. Test AUC +0.004 on MovieLens, +0.002 on 200k generated rows (2 seeds each)
    first_order: bool = True
    # dcnv2 only: each numeric also enters as a D-vector, ReLU(linear(cos, sin of learned frequencies x x)),
    # beside its scalar ("periodic"; Gorishniy et al. 2022), or as the scalar alone ("none"). Test AUC
    # +0.011 on configs/real/adult.yaml, -0.012 on MovieLens (2 seeds): searched by the default space
    numeric_embedding: Literal["none", "periodic"] = "none"
    # lightgbm only (training.gbdt): leaves per tree, rows per leaf, shrinkage, most trees (early stopping
    # on valid AUC picks how many are kept)
    num_leaves: int = Field(default=63, ge=2)
    min_data_in_leaf: int = Field(default=50, ge=1)
    gbdt_learning_rate: float = Field(default=0.05, gt=0)
    num_boost_round: int = Field(default=2000, ge=1)


class TrainConfig(_Strict):
    num_workers: int = Field(default=1, ge=1)
    cpus_per_worker: float = Field(default=1.0, gt=0)
    torch_threads: int | None = Field(default=None, ge=1)  # default: ceil(cpus_per_worker)
    data_cpus: float = Field(default=1.0, ge=0)  # CPUs left free for Ray Data while training
    # custom resources each Train worker (and one-worker trial) also holds, to place it on a node type:
    # e.g. {"gpu_node": 1} for a type declaring `resources: {gpu_node: 1}`, or {"accelerator_type:H100": 0.001}
    worker_resources: dict[str, Annotated[float, Field(gt=0)]] = {}
    use_gpu: Literal["auto", "true", "false"] | bool = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    optimizer: Literal["adam", "adagrad", "sparse_adam"] = "adam"
    lr: float = Field(default=5e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    # warm-up over the first 1% of steps (at most 500), then cosine decay to lr/10 at the end of train.epochs
    # (training.loop.lr_factor); "constant" keeps train.lr throughout
    lr_schedule: Literal["warmup_cosine", "constant"] = "warmup_cosine"
    # "auto" (the default) sizes these four from the train split's rows (training.sizing): budgets in
    # steps, patience in epochs, so 50k rows and 10M rows both train well without hand-setting
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"  # global: split across workers
    epochs: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    # logs usually arrive in time order; mixing ~a day of rows keeps batches from being all one hour
    shuffle_buffer: int = Field(default=65536, ge=0)
    evals_per_epoch: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"  # validation points per epoch
    patience: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"  # evaluations without a better valid AUC
    grad_clip: float | None = Field(default=10.0, gt=0)
    # share of known categorical ids replaced by the out-of-vocabulary id in training (unseen users/items)
    oov_dropout: float = Field(default=0.05, ge=0, lt=1)
    max_failures: int = Field(default=0, ge=-1)
    storage_path: str | None = None  # checkpoints (local or s3://); default RUN_DIR/checkpoints
    seed: int = 0
    log_every: int = Field(default=100, ge=1)

    @model_validator(mode="after")
    def _custom_only(self) -> TrainConfig:
        own = {"CPU": "cpus_per_worker", "GPU": "use_gpu", "memory": None, "object_store_memory": None}
        for k in self.worker_resources:
            if k in own:
                raise ValueError(f"train.worker_resources.{k}: CPU and GPU have their own keys "
                                 "(train.cpus_per_worker, train.use_gpu); this one takes custom resources only")
        return self


class TuneConfig(_Strict):
    num_samples: int = Field(default=16, ge=1)
    max_concurrent_trials: int = Field(default=1, ge=1)
    search_space: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # settings tried first, in order (e.g. today's production settings), each giving every key of the space
    start_points: list[dict[str, Any]] = Field(default_factory=list)
    # ASHA, in epochs: a trial runs at least grace_period; at each rung (grace_period x reduction_factor^k)
    # only the best 1/reduction_factor go on, decided at the trial's reports: every evaluation of a
    # one-worker trial (train.evals_per_epoch), the epoch ends of a several-worker one.
    grace_period: Annotated[float, Field(gt=0)] | Literal["auto"] = "auto"  # auto: training.sizing
    reduction_factor: int = Field(default=3, ge=2)
    seed: int = 0
    export_path: str | None = None  # winner bundle (local or s3://); default RUN_DIR/winner
    # auto: the winner is an ensemble of the best trials (greedy selection on valid) when it beats the best
    # trial on valid by 0.0005 AUC; always: the ensemble (from the best of each family), never: the best trial
    blend: Literal["auto", "always", "never"] = "auto"
    # the winner's LightGBM parts refit on train + valid with the trees early stopping chose (deep parts as trained)
    refit: bool = True


class PipelineConfig(_Strict):
    min_test_auc: float = Field(default=0.55, ge=0, le=1)  # the gate: below this the winner is not deployed
    baseline: bool = True  # also train `logreg` on the same split; the winner must beat it to be deployed
    deploy: bool = True  # deploy the winner on Serve and send a smoke request


class ServeAutoscaling(_Strict):
    """Serve's replica autoscaling: between min and max replicas, aiming at target_ongoing_requests per replica."""
    min_replicas: int = Field(default=1, ge=1)
    max_replicas: int = Field(default=4, ge=1)
    target_ongoing_requests: float = Field(default=8.0, gt=0)  # half a batch waiting per replica at the default
    upscale_delay_s: float = Field(default=3.0, ge=0)
    downscale_delay_s: float = Field(default=60.0, ge=0)

    @model_validator(mode="after")
    def _order(self) -> ServeAutoscaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"serve.autoscaling.max_replicas ({self.max_replicas}) is below min_replicas "
                             f"({self.min_replicas})")
        return self


class ServeVariant(_Strict):
    bundle: str  # a model bundle (local or s3://)
    share: float = Field(gt=0, le=1)  # of the requests it answers


class ServeConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    num_replicas: int = Field(default=1, ge=1)
    autoscaling: ServeAutoscaling | None = None  # set: replicas follow the load instead of num_replicas
    # A/B: several bundles served at once, each answering its share of the requests (shares add up to 1; the
    # response's model_version names the one that answered); empty: the one bundle given
    models: list[ServeVariant] = Field(default_factory=list)
    shadow: str | None = None  # a bundle that also scores every request: its scores are logged, never returned
    # rows the drift figures (PSI per feature and of the score, against the bundle's training sample) follow:
    # older rows fade out (training.drift)
    drift_window: int = Field(default=10_000, ge=100)
    max_ongoing_requests: int = Field(default=32, ge=1)
    max_queued_requests: int = Field(default=64, ge=-1)
    max_batch_size: int = Field(default=16, ge=1)
    batch_wait_timeout_s: float = Field(default=0.002, ge=0)
    max_candidates: int = Field(default=1000, ge=1)
    max_body_bytes: int = Field(default=1_000_000, ge=1)
    api_key_env: str | None = None
    # proxy: Serve's HTTP proxy on host:port routes to the replicas: several replicas, rolling model updates,
    # a crashed replica replaced in seconds. direct: the one replica answers on host:port itself (Serve's
    # direct ingress, no proxy hop): ~2.4x the requests per second at a third of the p99 on a small machine
    # (benchmarks/bench_serve.py), but one replica, a new model replaces the app (a gap of a few seconds) and
    # a crashed replica may wait ~60 s for the port (the kernel's TIME_WAIT). Serve reads it when its
    # processes start: it applies to a Serve started by rankray (`rankray serve`, the pipeline).
    ingress: Literal["proxy", "direct"] = "proxy"
    # where Serve runs its HTTP proxies: the head only, or every node with a replica (each on serve.host:port;
    # for a load balancer in front of the nodes, with serve.host 0.0.0.0). On 127.0.0.1 only the head's is
    # reachable from where rankray runs.
    proxy_location: Literal["HeadOnly", "EveryNode"] = "HeadOnly"

    @model_validator(mode="after")
    def _direct_is_one_replica(self) -> ServeConfig:
        if self.models and abs(sum(m.share for m in self.models) - 1) > 1e-6:
            raise ValueError(f"serve.models: the shares add up to {sum(m.share for m in self.models):g}, not 1")
        if self.ingress == "direct" and self.autoscaling is not None and self.autoscaling.max_replicas > 1:
            raise ValueError("serve.autoscaling: serve.ingress 'direct' runs one replica on serve.port; use "
                             "serve.ingress 'proxy' to autoscale")
        if self.ingress == "direct" and self.num_replicas != 1:
            raise ValueError(f"serve.num_replicas is {self.num_replicas}: serve.ingress 'direct' runs one replica "
                             "on serve.port; use serve.ingress 'proxy' for several")
        return self


class RayConfig(_Strict):
    address: str | None = None  # default: RAY_ADDRESS, else a local Ray started on the fly
    num_cpus: int | None = Field(default=None, ge=1)
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 8265
    include_dashboard: bool = True
    # the autoscaler's node types (a `ray up` cluster config: available_node_types, max_workers): what the
    # cluster can grow to. Default: ~/ray_bootstrap_config.yaml when it exists (on a `ray up` head, where a
    # submitted job runs), else the cluster is what is up now
    autoscaler_config: str | None = None
    resource_timeout_s: float = Field(default=600.0, gt=0)  # how long to wait for the autoscaler's nodes


class RunConfig(_Strict):
    # one path component: letters, digits, _ . - only (no shell syntax, no separators, not . or ..)
    name: str = Field(default="rankray", pattern=r"^[A-Za-z0-9_.-]+$")
    dir: str = "runs"  # local path or s3://

    @model_validator(mode="after")
    def _not_dots(self) -> RunConfig:
        if self.name in (".", ".."):
            raise ValueError(f"run.name {self.name!r} would write outside run.dir")
        return self


class Config(_Strict):
    run: RunConfig = Field(default_factory=RunConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    data: DataConfig
    features: FeaturesConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)

    @property
    def run_dir(self) -> str:
        return f"{self.run.dir.rstrip('/')}/{self.run.name}"


# ---------------------------------------------------------------- loading
_PLAIN = {"extra_forbidden": "unknown key", "missing": "required key is missing"}


def _format_errors(err: ValidationError, origin: str) -> str:
    """One line per error, each starting with the dotted key path (e.g. `train.lr: ...`)."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("function-after", "tagged-union")))
        line = f"  {path or '(top level)'}: {_PLAIN.get(e['type'], e['msg'])}"
        if e["type"] not in _PLAIN and not isinstance(e.get("input"), dict):
            line += f" (got {e['input']!r})"
        lines.append(line)
    return f"invalid config {origin}:\n" + "\n".join(lines)


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false, so keys like `on:` (a join key) stay strings."""


_Loader.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
                                   for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


# YAML 1.2 floats too: `lr: 1e-5` is a number (YAML 1.1 wants `1.0e-5` and would give the string '1e-5')
_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def _parse_value(text: str) -> Any:
    """`--set` values are YAML scalars/lists: 3, 0.1, true, [64, 32], dcnv2."""
    return parse_yaml(text) if text != "" else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to a raw config dict (list items by index: features.0.name=x)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=0.003")
        key, text = item.split("=", 1)
        try:
            value = _parse_value(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: {text!r} is not a YAML value ({getattr(e, 'problem', e)}); "
                              f"quote it: {key}='\"...\"'") from None
        parts = key.strip().split(".")
        node: Any = raw
        for i, part in enumerate(parts[:-1]):
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {key}: {where} is not an index of the list")
                node = node[int(part)]
            elif isinstance(node, dict):
                node = node.setdefault(part, {})
                if node is None:
                    node = {}
            else:
                raise ConfigError(f"--set {key}: {where} is not a section")
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"--set {key}: {last} is not an index of the list")
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"--set {key}: {'.'.join(parts[:-1])} is not a section")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                raw: dict[str, Any] | None = None) -> Config:
    """Load and validate a config; raises ConfigError naming every bad key path."""
    origin = str(path) if path else "(dict)"
    if raw is None:
        if path is None:
            raise ConfigError("no config given: pass --config FILE")
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = parse_yaml(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config {p} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {origin} must be a mapping of sections, got {type(raw).__name__}")
    raw = apply_overrides(json.loads(json.dumps(raw)), list(overrides or []))
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, origin)) from None


def config_with(cfg: Config, overrides: dict[str, Any]) -> Config:
    """A copy of `cfg` with dotted-path overrides applied, validated again (used by Tune)."""
    raw = cfg.model_dump(mode="json")
    for key, value in overrides.items():
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = value
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, "(overrides)")) from None


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (written next to every output)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def fingerprint(cfg: Config, sections: Mapping[str, Collection[str]], extra: Any = None) -> str:
    """sha256 of what an output depends on: the named config sections, each without the keys listed for
    it (settings that do not change the output), and `extra` (e.g. a file layout version)."""
    dump = cfg.model_dump(mode="json")
    parts = {name: {k: v for k, v in dump[name].items() if k not in skip} for name, skip in sections.items()}
    return hashlib.sha256(json.dumps({"config": parts, "extra": extra}, sort_keys=True, default=str).encode()).hexdigest()


def env_or(value: str | None, *names: str) -> str | None:
    if value:
        return value
    for n in names:
        if os.environ.get(n):
            return os.environ[n]
    return None
