"""What a run needs from the cluster: the device policy, the CPU/GPU check before anything starts, and
where the cluster's dashboard is."""
from __future__ import annotations

import ray

from training.config import Config, ConfigError


def resolve_device(cfg: Config) -> tuple[bool, str]:
    """(use_gpu, precision) from `auto` settings, as seen from the cluster's resources."""
    use = cfg.train.use_gpu
    if use == "auto":
        use_gpu = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    else:
        use_gpu = use in (True, "true")
    # auto = fp32: the shipped models are small and launch-bound, and bf16 autocast measured 0.84-1.0x
    # of fp32's samples/s on an H200 (benchmarks/bench_gpu.py); bf16 stays a choice for big towers.
    precision = cfg.train.precision if cfg.train.precision != "auto" else "fp32"
    return use_gpu, precision


def check_resources(cfg: Config, use_gpu: bool, trials: int = 1) -> None:
    """Fail before starting when `trials` concurrent Train runs would leave Ray Data no CPU: that hangs
    silently."""
    t = cfg.train
    total = ray.cluster_resources().get("CPU", 0)
    need = trials * t.num_workers * t.cpus_per_worker + t.data_cpus
    runs = f"tune.max_concurrent_trials ({trials}) x " if trials > 1 else ""
    if need > total + 1e-9:
        raise ConfigError(
            f"{runs}train.num_workers ({t.num_workers}) x train.cpus_per_worker ({t.cpus_per_worker}) + "
            f"train.data_cpus ({t.data_cpus}) = {need:g} CPUs, but the cluster has {total:g}: lower "
            f"{'max_concurrent_trials, ' if trials > 1 else ''}train.cpus_per_worker (fractions are fine) or "
            "num_workers, or add nodes")
    if use_gpu and ray.cluster_resources().get("GPU", 0) < trials * t.num_workers:
        raise ConfigError(f"train.use_gpu is on but the cluster has fewer GPUs than {runs}train.num_workers "
                          f"({trials * t.num_workers})")


def dashboard_url() -> str:
    """The connected cluster's dashboard URL, or '' when it runs none."""
    try:
        url = ray.get_runtime_context().worker.node.address_info.get("webui_url") or ""
    except AttributeError:
        url = ""
    return f"http://{url}" if url and not url.startswith("http") else url
