"""What a run needs from the cluster: the device policy, the CPU/GPU check before anything starts (against
what the cluster has, or can grow to when an autoscaler's node types are known), asking the autoscaler for
the nodes and waiting for them, and where the cluster's dashboard is."""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import ray
import yaml

from training import console
from training.config import Config, ConfigError

BOOTSTRAP = "~/ray_bootstrap_config.yaml"  # where `ray up` leaves the cluster config on the head node
Resources = dict[str, float]


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: Resources
    max_count: int  # the most of it the autoscaler runs (the head type: 1)


def autoscaler_config(cfg: Config) -> str | None:
    """ray.autoscaler_config, else the `ray up` bootstrap config when this machine has one."""
    if cfg.ray.autoscaler_config:
        return cfg.ray.autoscaler_config
    return BOOTSTRAP if os.path.exists(os.path.expanduser(BOOTSTRAP)) else None


def node_types(cfg: Config) -> list[NodeType]:
    """The autoscaler's node types with the most of each it may run ([] when the cluster cannot grow)."""
    path = autoscaler_config(cfg)
    if path is None:
        return []
    where = f"ray.autoscaler_config ({path})"
    try:
        with open(os.path.expanduser(path)) as f:
            raw = yaml.safe_load(f)  # YAML or JSON
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{where}: cannot read it: {e}") from None
    types = raw.get("available_node_types") if isinstance(raw, dict) else None
    if not isinstance(types, dict) or not types:
        raise ConfigError(f"{where}: no available_node_types (a Ray cluster config's node types)")
    cap = raw.get("max_workers")
    out = []
    for name, t in types.items():
        res = (t or {}).get("resources") or {}
        if not isinstance(res, dict) or not all(isinstance(v, (int, float)) for v in res.values()):
            raise ConfigError(f"{where}: available_node_types.{name}.resources must map names to numbers")
        most = 1 if name == raw.get("head_node_type") else int((t or {}).get("max_workers", 0))
        out.append(NodeType(name, {k: float(v) for k, v in res.items()}, min(most, cap) if cap is not None else most))
    return out


def _gpu_types(types: list[NodeType]) -> bool:
    return any(t.resources.get("GPU", 0) > 0 and t.max_count > 0 for t in types)


def resolve_device(cfg: Config) -> tuple[bool, str]:
    """(use_gpu, precision) from `auto` settings: GPUs when the cluster has them up, or its autoscaler can
    start a node type that has them (a cold autoscaling cluster starts with none)."""
    use = cfg.train.use_gpu
    if use == "auto":
        use_gpu = ray.is_initialized() and (ray.cluster_resources().get("GPU", 0) > 0 or _gpu_types(node_types(cfg)))
    else:
        use_gpu = use in (True, "true")
    # auto = fp32: the shipped models are small and launch-bound, and bf16 autocast measured 0.84-1.0x
    # of fp32's samples/s on an H200 (benchmarks/bench_gpu.py); bf16 stays a choice for big towers.
    precision = cfg.train.precision if cfg.train.precision != "auto" else "fp32"
    return use_gpu, precision


def bundles_for(cfg: Config, use_gpu: bool, trials: int = 1) -> list[Resources]:
    """What the run holds at once: each Train worker of each concurrent trial, and Ray Data's CPUs."""
    t = cfg.train
    worker = {"CPU": t.cpus_per_worker, **({"GPU": 1.0} if use_gpu else {}), **t.worker_resources}
    return [dict(worker) for _ in range(trials * t.num_workers)] + ([{"CPU": t.data_cpus}] if t.data_cpus else [])


def totals(bundles: list[Resources]) -> Resources:
    out: Resources = {}
    for b in bundles:
        for k, v in b.items():
            out[k] = out.get(k, 0.0) + v
    return out


def capacity(live: Resources, types: list[NodeType]) -> Resources:
    """The most the cluster can hold: every node type at its maximum (live nodes are among them), or what is
    up now when it cannot grow."""
    most: Resources = totals([{k: v * t.max_count for k, v in t.resources.items()} for t in types])
    return {k: max(most.get(k, 0.0), live.get(k, 0.0)) for k in set(most) | set(live)}


def _fits(bundle: Resources, node: Resources) -> bool:
    return all(node.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items())


def check_resources(cfg: Config, use_gpu: bool, trials: int = 1, *, live: Resources | None = None,
                    nodes: list[Resources] | None = None, types: list[NodeType] | None = None) -> None:
    """Fail before any work when the run can never get what it holds at once: more CPUs or GPUs than the
    cluster has or can grow to (an autoscaler's node types at their maximum), a worker bigger than any node,
    or so many concurrent Train workers that Ray Data is left no CPU (that hangs silently). `live`, `nodes`
    (each live node's resources) and `types` default to the connected cluster's."""
    t = cfg.train
    live = ray.cluster_resources() if live is None else live
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")] if nodes is None else nodes
    types = node_types(cfg) if types is None else types
    most = capacity(live, types)
    grow = f" and can grow to {{:g}} (the node types of {autoscaler_config(cfg)})" if types else ""
    need = totals(bundles_for(cfg, use_gpu, trials))
    runs = f"tune.max_concurrent_trials ({trials}) x " if trials > 1 else ""
    if need.get("CPU", 0) > most.get("CPU", 0) + 1e-9:
        raise ConfigError(
            f"{runs}train.num_workers ({t.num_workers}) x train.cpus_per_worker ({t.cpus_per_worker}) + "
            f"train.data_cpus ({t.data_cpus}) = {need['CPU']:g} CPUs, but the cluster has {live.get('CPU', 0):g}"
            + grow.format(most.get("CPU", 0)) + ": lower "
            f"{'max_concurrent_trials, ' if trials > 1 else ''}train.cpus_per_worker (fractions are fine) or "
            "num_workers, or add nodes")
    if need.get("GPU", 0) > most.get("GPU", 0) + 1e-9:
        raise ConfigError(f"train.use_gpu is on: {runs}train.num_workers = {need['GPU']:g} GPUs, but the cluster "
                          f"has {live.get('GPU', 0):g}" + grow.format(most.get("GPU", 0)))
    for k in t.worker_resources:
        if need[k] > most.get(k, 0) + 1e-9:
            raise ConfigError(f"train.worker_resources.{k}: {runs}train.num_workers = {need[k]:g} {k}, but the cluster "
                              f"has {live.get(k, 0):g}" + grow.format(most.get(k, 0)))
    worker = bundles_for(cfg, use_gpu)[0]
    shapes = [*nodes, *(x.resources for x in types if x.max_count > 0)]
    if shapes and not any(_fits(worker, s) for s in shapes):
        biggest = max(shapes, key=lambda s: (s.get("GPU", 0), s.get("CPU", 0)))
        raise ConfigError(f"a Train worker needs {_shown(worker)} (train.cpus_per_worker"
                          f"{', one GPU' if use_gpu else ''}{', train.worker_resources' if t.worker_resources else ''}"
                          "), more than any node has or the autoscaler can "
                          f"start (the biggest: {_shown(biggest)}): lower train.cpus_per_worker")


def _shown(r: Resources) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(r.items()) if k in ("CPU", "GPU") or not k.startswith("node:"))


_held = [0]  # nodes_for is re-entrant: only the outermost asks the autoscaler and lets go


@contextmanager
def nodes_for(cfg: Config, use_gpu: bool, trials: int = 1, *, live: Callable[[], Resources] | None = None,
              poll_s: float = 1.0) -> Iterator[None]:
    """Hold the run's resources from the autoscaler: when the cluster does not have them up yet, ask for them
    (`request_resources`, so a cold cluster scales up before the first task waits), wait with a progress line
    until they are up, at most ray.resource_timeout_s (then an error naming what never came), and let go
    when the run ends so the nodes can scale down. Nothing happens when they are up already."""
    need = totals(bundles_for(cfg, use_gpu, trials))
    live = live or ray.cluster_resources
    if _held[0] or _enough(live(), need):
        _held[0] += 1
        try:
            yield
        finally:
            _held[0] -= 1
        return
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles_for(cfg, use_gpu, trials))
    _held[0] += 1
    try:
        t0, said = time.monotonic(), -1e9
        while not _enough(now := live(), need):
            waited = time.monotonic() - t0
            if waited > cfg.ray.resource_timeout_s:
                raise TimeoutError(f"waited {waited:.0f} s (ray.resource_timeout_s) for the autoscaler; never came: "
                                   + ", ".join(f"{v - now.get(k, 0):g} of {v:g} {k}" for k, v in need.items()
                                               if now.get(k, 0) + 1e-9 < v))
            if waited - said >= 15:
                console.say("waiting for nodes: " + ", ".join(f"{k} {now.get(k, 0):g}/{v:g} up" for k, v in need.items())
                            + f", {waited:.0f} s")
                said = waited
            time.sleep(poll_s)
        yield
    finally:
        _held[0] -= 1
        request_resources(bundles=[])


@contextmanager
def held(cfg: Config, trials: int = 1, *, gbdt_only: bool = False) -> Iterator[None]:
    """A run's resources, before any data work: the device decided, checked against what the cluster has or can
    grow to, and held from the autoscaler (nodes_for) for the body."""
    use_gpu = resolve_device(cfg)[0] and not gbdt_only
    check_resources(cfg, use_gpu, trials)
    with nodes_for(cfg, use_gpu, trials):
        yield


def _enough(have: Resources, need: Resources) -> bool:
    return all(have.get(k, 0.0) + 1e-9 >= v for k, v in need.items())


def dashboard_url() -> str:
    """The connected cluster's dashboard URL, or '' when it runs none."""
    try:
        url = ray.get_runtime_context().worker.node.address_info.get("webui_url") or ""
    except AttributeError:
        url = ""
    return f"http://{url}" if url and not url.startswith("http") else url
