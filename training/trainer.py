"""The training driver: config -> prepared data -> TorchTrainer.fit() -> model bundle + report."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

import ray
import ray.data
import ray.train
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from safetensors.torch import load_file

from raycluster.config import Config, ConfigError
from training import storage
from training.bundle import save_bundle
from training.data import s3_options
from training.evaluate import evaluate_model, fields_of
from training.features import Preprocessor
from training.loop import resolve_device, train_loop
from training.models import model_arch, model_from_arch
from training.prepare import encoded_datasets, ensure_prepared


@dataclass
class TrainResult:
    metrics: dict[str, Any]  # final report: test metrics, best valid AUC, epochs run, history
    bundle: str | None
    run_name: str
    seconds: float


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


def storage_location(path: str, cfg: Config) -> tuple[str, Any]:
    """RunConfig storage: an absolute local path, or (bucket/prefix, S3 filesystem)."""
    if storage.is_s3(path):
        fs, inner = storage.filesystem(path, s3_options(cfg))
        return inner, fs
    return os.path.abspath(path), None


def loop_config(cfg: Config, pp_json: str, train_rows: int) -> dict[str, Any]:
    """What the training loop is given (`training.loop.run_loop`); the preprocessor as its JSON."""
    return {"cfg": cfg.model_dump(mode="json"), "pp": pp_json, "train_rows": train_rows}


def quiet(datasets: dict[str, ray.data.Dataset]) -> None:
    """No progress bars: per-epoch bars flood the job log."""
    ray.data.DataContext.get_current().enable_progress_bars = False
    for ds in datasets.values():  # each dataset carries the context it was made in (e.g. a Tune driver's)
        ds.context.enable_progress_bars = False


def make_trainer(cfg: Config, pp: Preprocessor, datasets: dict[str, ray.data.Dataset], run_name: str,
                 train_rows: int, callbacks: list | None = None) -> TorchTrainer:
    use_gpu, _ = resolve_device(cfg)
    check_resources(cfg, use_gpu)
    quiet(datasets)
    t = cfg.train
    path, fs = storage_location(t.storage_path or storage.join(cfg.run_dir, "checkpoints"), cfg)
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config(cfg, pp.to_json(), train_rows),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=callbacks),
        datasets=datasets,
        # one worker reads each dataset whole: no split coordinator actor to start (about 1 s per fit)
        dataset_config=DataConfig(datasets_to_split="all" if t.num_workers > 1 else []),
    )


def best_model_from(checkpoint: ray.train.Checkpoint, cfg: Config, pp: Preprocessor) -> tuple[Any, dict]:
    """The best-validation weights saved in a checkpoint, loaded into a fresh model (safetensors)."""
    arch = model_arch(cfg.model, fields_of(pp), len(pp.num_columns))
    model = model_from_arch(arch)
    with checkpoint.as_directory() as d:
        model.load_state_dict(load_file(os.path.join(d, "best.safetensors")))
    model.eval()
    return model, arch


def train(cfg: Config, *, run_name: str | None = None, bundle_path: str | None = None,
          write_bundle: bool = True) -> TrainResult:
    """Train one model as the config says; write its bundle (with report) unless told not to."""
    t0 = time.time()
    prep = ensure_prepared(cfg)
    pp = prep["preprocessor"]
    name = run_name or cfg.run.name
    trainer = make_trainer(cfg, pp, encoded_datasets(prep["encoded"], cfg, prep), name,
                           prep["profile"]["rows_by_split"]["train"])
    result = trainer.fit()
    if result.error:
        raise result.error
    metrics = dict(result.metrics)
    bundle = None
    if write_bundle:
        model, arch = best_model_from(result.checkpoint, cfg, pp)
        bundle = bundle_path or storage.join(cfg.run_dir, "model")
        export_bundle(cfg, pp, model, arch, metrics, prep, bundle)
    return TrainResult(metrics, bundle, name, time.time() - t0)


def export_bundle(cfg: Config, pp: Preprocessor, model: Any, arch: dict, metrics: dict, prep: dict, path: str,
                  info: dict | None = None) -> dict[str, float]:
    """Evaluate on test with Ray Data, write the bundle (report.html inside, test metrics also in the
    manifest's info) and return the test metrics."""
    history = json.loads(metrics.get("history", "[]"))
    ev = evaluate_model(cfg, pp, model, "test", history=history,
                        meta={"model": cfg.model.name, "run": cfg.run.name})
    test = {f"test_{k}": v for k, v in ev["metrics"].items()}
    kept = {k: v for k, v in metrics.items() if k not in ("history", "starts")}
    save_bundle(path, cfg, pp, model, arch, {**kept, **test, "history": history}, prep["samples"],
                info={**(info or {}), "test_metrics": test}, report_html=ev["html"], s3=s3_options(cfg))
    return test
