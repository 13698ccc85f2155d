"""The training driver: config -> prepared data -> TorchTrainer.fit() -> the best weights scored on test
once (from the encoded split) -> model bundle + report."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

import ray.data
import ray.train
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from training import console, drift, storage
from training.bundle import save_bundle
from training.checkpoint import best_weights
from training.config import Config
from training.data import s3_options
from training.evaluate import evaluate_encoded, passes
from training.features import Preprocessor
from training.gbdt import fit_gbdt
from training.loop import Plan, train_loop
from training.models import model_arch, model_from_arch, model_label
from training.prepare import ensure_prepared
from training.reader import encoded_datasets, sample_split
from training.resources import check_resources, held, resolve_device
from training.scoring import fields_of, forward
from training.sizing import sized

FIT_SPLITS = ("train", "valid")  # what a Train run or a trial reads; test is scored once, by the driver


@dataclass
class TrainResult:
    metrics: dict[str, Any]  # final report + test metrics: best valid AUC, epochs run, history, test_*
    bundle: str | None
    run_name: str
    seconds: float


def storage_location(path: str, cfg: Config) -> tuple[str, Any]:
    """RunConfig storage: an absolute local path, or (bucket/prefix, S3 filesystem)."""
    if storage.is_s3(path):
        fs, inner = storage.filesystem(path, s3_options(cfg))
        return inner, fs
    return os.path.abspath(path), None


def loop_config(cfg: Config, pp_json: str, train_rows: int, board: Any = None) -> dict[str, Any]:
    """What the training loop is given (`training.loop.run_loop`); the preprocessor as its JSON."""
    return {"cfg": cfg.model_dump(mode="json"), "pp": pp_json, "train_rows": train_rows, "board": board}


def quiet(datasets: dict[str, ray.data.Dataset]) -> None:
    """No progress bars: per-epoch bars flood the job log."""
    ray.data.DataContext.get_current().enable_progress_bars = False
    for ds in datasets.values():  # each dataset carries the context it was made in (e.g. a Tune driver's)
        ds.context.enable_progress_bars = False


def make_trainer(cfg: Config, pp: Preprocessor, datasets: dict[str, ray.data.Dataset], run_name: str,
                 train_rows: int, callbacks: list | None = None, board: Any = None) -> TorchTrainer:
    cfg = sized(cfg, train_rows)
    use_gpu, _ = resolve_device(cfg)
    check_resources(cfg, use_gpu)
    quiet(datasets)
    t = cfg.train
    path, fs = storage_location(t.storage_path or storage.join(cfg.run_dir, "checkpoints"), cfg)
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config(cfg, pp.to_json(), train_rows, board),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker, **t.worker_resources}),
        run_config=RunConfig(name=run_name, storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=callbacks),
        datasets={k: v for k, v in datasets.items() if k in FIT_SPLITS},
        # one worker reads each dataset whole: no split coordinator actor to start (about 1 s per fit)
        dataset_config=DataConfig(datasets_to_split="all" if t.num_workers > 1 else []),
    )


def best_model(checkpoint: ray.train.Checkpoint, cfg: Config, pp: Preprocessor) -> tuple[Any, dict]:
    """The best-validation weights saved in a checkpoint, loaded into a fresh model (safetensors)."""
    arch = model_arch(cfg.model, fields_of(pp), len(pp.num_columns))
    model = model_from_arch(arch)
    model.load_state_dict(best_weights(checkpoint))
    model.eval()
    return model, arch


def finish(cfg: Config, prep: dict, model: Any, arch: dict, metrics: dict[str, Any], bundle: str | None,
           info: dict | None = None) -> dict[str, Any]:
    """Score the test split once (encoded, all rows) with the best weights; write the bundle (report.html
    inside, test metrics also in the manifest's info) when `bundle` is given. Returns the run's metrics
    with the test ones (`test_passes` counts the passes over test this took: 1)."""
    history = json.loads(metrics["history"]) if isinstance(metrics.get("history"), str) else metrics.get("history", [])
    before = passes["test"]
    with console.step("test") as st:
        ev = evaluate_encoded(cfg, prep["preprocessor"], model, arch, prep["encoded"], "test", history=history,
                              meta={"model": model_label(arch), "run": cfg.run.name})
        st["done"] = f"{ev['rows']:,} rows, AUC {ev['metrics']['auc']:.4f}"
    test = {f"test_{k}": v for k, v in ev["metrics"].items()}
    test["test_passes"] = passes["test"] - before
    kept = {k: v for k, v in metrics.items() if k not in ("history", "starts")}
    out = {**kept, **test, "history": history}
    if bundle:
        pp = prep["preprocessor"]
        x_cat, x_num = sample_split(prep["encoded"], "train", cfg, pp, drift.SAMPLE_ROWS)
        ref = drift.reference(pp, x_cat, x_num, forward(model, x_cat, x_num))  # what serving compares with
        save_bundle(bundle, cfg, pp, model, arch, out, prep["samples"], info={**(info or {}), "test_metrics": test},
                    report_html=ev["html"], drift=ref, s3=s3_options(cfg))
    return {**metrics, **test}


def _render_train(bar: console.Bar) -> Any:
    def render(s: dict[str, Any]) -> None:
        done = (s["epoch"] - 1) * s["steps_per_epoch"] + s["step"]
        best = f"  best valid AUC {s['best_valid_auc']:.4f}" if s["best_valid_auc"] > 0 else ""
        bar.total = s["epochs"] * s["steps_per_epoch"]
        bar.update(done, f"epoch {s['epoch']}/{s['epochs']}  {s['samples_per_s']:,.0f} samples/s{best}")
    return render


def train(cfg: Config, *, run_name: str | None = None, bundle_path: str | None = None,
          write_bundle: bool = True) -> TrainResult:
    """Train one model as the config says, score test once; write its bundle (with report) unless told not to.
    What it needs from the cluster is checked before any data work, and asked of the autoscaler."""
    with held(cfg, gbdt_only=cfg.model.name == "lightgbm"):
        return _train(cfg, run_name, bundle_path, write_bundle)


def _train(cfg: Config, run_name: str | None, bundle_path: str | None, write_bundle: bool) -> TrainResult:
    t0 = time.time()
    prep = ensure_prepared(cfg)
    pp = prep["preprocessor"]
    name = run_name or cfg.run.name
    rows = prep["profile"]["rows_by_split"]["train"]
    cfg = sized(cfg, rows)  # "auto" batch size, epochs, evaluations and patience, for this many rows
    t = cfg.train
    bundle = (bundle_path or storage.join(cfg.run_dir, "model")) if write_bundle else None
    if cfg.model.name == "lightgbm":  # a booster, not gradient steps: one Ray task (training.gbdt)
        with console.step(f"train lightgbm: {rows:,} rows, {t.num_workers * t.cpus_per_worker:g} CPU") as st:
            model, arch, metrics = fit_gbdt(cfg, pp, prep["encoded"])
            st["done"] = (f"{metrics['best_iteration']} trees (of {metrics['rounds_run']} rounds), "
                          f"valid AUC {metrics['best_valid_auc']:.4f}")
        return TrainResult(finish(cfg, prep, model, arch, metrics, bundle), bundle, name, time.time() - t0)
    board = console.ProgressBoard.remote()
    trainer = make_trainer(cfg, pp, encoded_datasets(prep["encoded"], cfg, prep, FIT_SPLITS), name, rows, board=board)
    plan = Plan.of(cfg, rows, t.num_workers)
    console.say(f"train {cfg.model.name}: {rows:,} rows, {t.num_workers} worker(s) x {t.cpus_per_worker:g} CPU, "
                f"batch {t.batch_size}, up to {t.epochs} epochs of {plan.steps_per_epoch:,} steps")
    bar = console.Bar("  train", t.epochs * plan.steps_per_epoch, "steps")
    try:
        with console.watch(board, _render_train(bar)):
            result = trainer.fit()
    finally:
        ray.kill(board)
    if result.error:
        raise result.error
    metrics = dict(result.metrics)
    history = json.loads(metrics["history"])
    bar.close("\n".join(f"  epoch {r['epoch']}: loss {r['train_loss']:.4f}, "
                        + (f"valid AUC {r['valid_auc']:.4f}, " if "valid_auc" in r else "")
                        + f"{r['samples_per_s']:,.0f} samples/s" for r in history))
    model, arch = best_model(result.checkpoint, cfg, pp)
    return TrainResult(finish(cfg, prep, model, arch, metrics, bundle), bundle, name, time.time() - t0)
