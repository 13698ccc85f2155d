"""Hyperparameter search the Train V2 way: a Tuner runs one driver function per trial; with several
workers it builds and fits a TorchTrainer (the same `make_trainer` as `rankray train`) with
TuneReportCallback. A one-worker trial runs the same loop in the trial's own process instead
(`training.loop.TuneSession`): a TorchTrainer would start a controller, a worker and a data actor, each
a new process importing torch, ~8 s of every trial on 2 cores; Tune reuses the trial process, so
every trial after the first starts training within 0.1 s (benchmarks/bench_tune.py).
OptunaSearch (TPE, seeded) proposes, ASHA stops weak trials at epoch rungs on the validation AUC
computed over all workers' rows. Data is fitted, encoded and materialized once per search.

Resource rule: a trial takes `num_workers x cpus_per_worker` CPUs (its Train workers; a several-worker
trial's driver asks for no CPU, a little memory); `max_concurrent_trials` of them plus
`train.data_cpus` must fit the cluster's CPUs, so Ray Data always keeps CPUs to read with (a starved
reader hangs silently).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
import ray
import ray.train
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from training import console, storage
from training.checkpoint import TrainState, save_checkpoint, weights_of
from training.config import Config, ConfigError, config_with, dump_config, fingerprint
from training.data import s3_options
from training.evalmetrics import roc_auc
from training.features import Preprocessor
from training.gbdt import fit_gbdt, refit_gbdt
from training.loop import TuneSession, run_loop
from training.prepare import ensure_prepared
from training.models import Blend, blend_arch, model_label
from training.reader import encoded_datasets, read_split
from training.report import fmt, results_page, svg_line_chart
from training.scoring import forward
from training.resources import check_resources, dashboard_url, held, resolve_device
from training.sizing import sized
from training.trainer import FIT_SPLITS, best_model, finish, loop_config, make_trainer, quiet, storage_location
from tune.space import GBDT, model_names, parse_space, search_space, start_points, trial_config, trial_params

METRIC = "best_valid_auc"  # in every report (epoch and final); best-so-far is what early stopping compares
TIME_ATTR = "epoch"
# A trial's driver only waits on its Train run: it takes no CPU (Tune needs some resource in a trial's
# request, so it asks for a little memory), leaving whole CPUs to the Train workers and to Ray Data.
DRIVER_RESOURCES = {"cpu": 0, "memory": 64 * 2**20}


@dataclass
class SearchResult:
    table: list[dict[str, Any]]
    winner: dict[str, Any]
    bundle: str
    results_csv: str
    results_html: str
    seconds: float


def check_early_stopping(asha: bool) -> None:
    """An ASHA-stopped trial's Train workers are released by Ray Train's placement-group cleaner, which
    asks the dashboard's state API whether the trial is gone: without a dashboard they are never
    released and the next trial waits forever for CPUs. Refuse that before any trial starts."""
    if asha and not dashboard_url():
        raise ConfigError("tune: early stopping (ASHA) needs the Ray dashboard, which releases stopped trials' "
                          "workers; set ray.include_dashboard: true (it binds to 127.0.0.1)")


def search_fingerprint(cfg: Config) -> str:
    """What a restored search must share with the interrupted one."""
    return fingerprint(cfg, {"data": (), "features": (), "model": (), "train": (), "tune": ("export_path",)})


def _abs(path: str) -> str:
    """Trial drivers may run with another working directory: pass them absolute paths."""
    return path if storage.is_s3(path) else os.path.abspath(path)


def _trial(params: dict[str, Any], *, base: dict, pp_json: str, datasets: dict, encoded: str, train_rows: int,
           trials_dir: str, use_gpu: bool) -> None:
    """One trial: this trial's config -> a LightGBM fit, the loop here (one worker), or TorchTrainer.fit()
    with TuneReportCallback carrying the reports."""
    cfg = config_with(trial_config(Config.model_validate(base), params), {"train.storage_path": trials_dir})
    if cfg.model.name == GBDT:
        _gbdt_trial(cfg, pp_json, encoded)
        return
    if cfg.train.num_workers == 1:
        quiet(datasets)
        run_loop(loop_config(cfg, pp_json, train_rows), TuneSession(datasets, use_gpu))
        return
    trial_id = tune.get_context().get_trial_id()
    trainer = make_trainer(cfg, Preprocessor.from_json(pp_json), datasets, trial_id, train_rows,
                           callbacks=[TuneReportCallback()])
    trainer.fit()  # same run name on restore: Train resumes from the trial's latest checkpoint


def _gbdt_trial(cfg: Config, pp_json: str, encoded: str) -> None:
    """A lightgbm trial: one fit (early stopping on valid inside it; in this process when the trial holds
    the CPUs, else as a task on the Train workers' share) and one report with its checkpoint. The report has
    no epoch: ASHA's rungs compare deep trials at equal epochs, and pass this one by."""
    model, arch, m = fit_gbdt(cfg, Preprocessor.from_json(pp_json), encoded, here=cfg.train.num_workers == 1)
    report = {**{k: v for k, v in m.items() if k.startswith("valid_")}, METRIC: m["best_valid_auc"],
              "trees": m["best_iteration"], "rounds_run": m["rounds_run"], "final": True,
              "history": json.dumps(m["history"])}
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(d, model, weights_of(model), [], TrainState(best_auc=m["best_valid_auc"]), arch)
        tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))


class TrialClock(tune.Callback):
    """Wall clock of each trial's start as Tune sees it: fixed cost = first training step - start."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.first_step: dict[str, float] = {}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.started[trial.trial_id] = time.time()  # again when a failed trial is retried: its new start
        self.first_step.pop(trial.trial_id, None)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get("first_step_at"):
            self.first_step.setdefault(trial.trial_id, result["first_step_at"])

    def startup(self, trial_id: str) -> float | None:
        if trial_id in self.started and trial_id in self.first_step:
            return self.first_step[trial_id] - self.started[trial_id]
        return None


def make_tuner(cfg: Config, prep: dict, *, restart: bool = False, callbacks: list | None = None,
               random_search: bool = False, asha: bool = True, name: str = "search") -> tune.Tuner:
    """A new Tuner for this config's search, or the interrupted one restored (same run name)."""
    space = parse_space(cfg)
    use_gpu = resolve_device(cfg)[0]
    check_resources(cfg, use_gpu, trials=cfg.tune.max_concurrent_trials)
    in_trial = cfg.train.num_workers == 1  # the loop runs in the trial's process (no Train actors)
    check_early_stopping(asha and not in_trial)
    # Tune snapshots the experiment state every num_to_keep (2) checkpoints of a trial and warns when
    # that happens more than once in 5 s, which fast one-worker trials do: a few small files, kept quiet
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if not console.verbose():  # Tune's new console prints its settings box and paths even at verbose=0; Optuna
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # says "a new study created": the search's bar says it all
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    s3 = s3_options(cfg)
    root = _abs(storage.join(cfg.run_dir, "tune"))
    path, fs = storage_location(root, cfg)
    exp_path = f"{path}/{name}"
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=cfg.model_dump(mode="json"), pp_json=prep["preprocessor"].to_json(),
                             datasets=encoded_datasets(prep["encoded"], cfg, prep, FIT_SPLITS),
                             encoded=_abs(prep["encoded"]),
                             train_rows=prep["profile"]["rows_by_split"]["train"],
                             trials_dir=storage.join(root, f"{name}-trials"), use_gpu=use_gpu),
        tune.PlacementGroupFactory([{"CPU": cfg.train.cpus_per_worker, "GPU": int(use_gpu),
                                     **cfg.train.worker_resources}]) if in_trial else DRIVER_RESOURCES)
    fp_file = storage.join(root, f"{name}-fingerprint.txt")
    fp = search_fingerprint(cfg)
    if not restart and tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
        if storage.exists(fp_file, s3) and storage.read_text(fp_file, s3) != fp:
            raise ConfigError(f"run {cfg.run.name!r} already holds a search with other settings "
                              f"({storage.join(root, name)}): use a new run.name, or --restart to discard it")
        console.say(f"resuming the search in {storage.join(root, name)}")
        return tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=fs)
    if restart:
        storage.delete_dir(storage.join(root, name), s3)
        storage.delete_dir(storage.join(root, f"{name}-trials"), s3)
    storage.write_text(fp_file, fp, s3)
    tc = cfg.tune
    first = start_points(cfg) or None
    # define-by-run (the space is conditional on model.name); TPE models each family's keys apart (group,
    # which Optuna marks experimental: said once here, not in every search's console)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    sampler = optuna.samplers.RandomSampler(seed=tc.seed) if random_search else optuna.samplers.TPESampler(
        seed=tc.seed, n_startup_trials=max(2, min(10, tc.num_samples // 3)), multivariate=True, group=True)
    search_alg = OptunaSearch(space=space, metric=METRIC, mode="max", sampler=sampler, points_to_evaluate=first)
    # max_t one past the last epoch: ASHA's cap never cuts the final report (and its checkpoint); the trial
    # ends itself after it
    scheduler = ASHAScheduler(time_attr=TIME_ATTR, max_t=cfg.train.epochs + 1, grace_period=tc.grace_period,
                              reduction_factor=tc.reduction_factor) if asha else None
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", search_alg=search_alg, scheduler=scheduler,
                                    num_samples=tc.num_samples, max_concurrent_trials=tc.max_concurrent_trials,
                                    reuse_actors=in_trial),
        # a one-worker trial's checkpoints are Tune's (a several-worker trial's are its Train run's); a
        # failed one is retried from its latest, as Train retries its workers
        run_config=tune.RunConfig(name=name, storage_path=path, storage_filesystem=fs, callbacks=callbacks,
                                  verbose=1 if console.verbose() else 0, checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                  failure_config=tune.FailureConfig(max_failures=cfg.train.max_failures
                                                                    if in_trial else 0)),
    )


def results_table(grid: Any, cfg: Config, clock: TrialClock | None = None) -> list[dict[str, Any]]:
    """One row per trial: id, params, best valid AUC, epochs, stopped early (by whom), wall time."""
    rows, keys, trees = [], list(search_space(cfg)), GBDT in model_names(cfg)
    for r in grid:
        m = r.metrics or {}
        trial_id = m.get("trial_id") or os.path.basename(r.path or "")
        done = bool(m.get("final"))  # not Tune's reserved "done": that would end the trial early
        stopped = "asha" if not done and r.error is None else ("patience" if m.get("stopped_early") else "")
        params = trial_params(cfg, r.config)  # a trial has its own family's keys: the others are "-"
        row: dict[str, Any] = {"trial": trial_id, **{k: params.get(k) for k in keys},
                               "best_valid_auc": m.get(METRIC), "epochs_run": m.get(TIME_ATTR),
                               **({"trees": m.get("trees")} if trees else {}),
                               "stopped_early": bool(stopped), "stopped_by": stopped or "-",
                               "wall_s": m.get("time_total_s"),
                               "error": type(r.error).__name__ if r.error else ""}
        if clock is not None:
            row["startup_s"] = clock.startup(trial_id)
        rows.append(row)
    rows.sort(key=lambda x: -x["best_valid_auc"] if _finite(x["best_valid_auc"]) else math.inf)
    return rows


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _charts(grid: Any, cfg: Config) -> list[str]:
    """Valid AUC per trial over epochs (lines), and each searched parameter against the trial's best valid
    AUC (a scatter, log10 of the value for log-uniform ones)."""
    curves = {}
    for r in grid:
        df = r.metrics_dataframe
        if df is not None and "valid_auc" in df and TIME_ATTR in df:
            d = df[df["valid_auc"].notna()]
            curves[str((r.metrics or {}).get("trial_id", "?"))] = (d[TIME_ATTR].tolist(), d["valid_auc"].tolist())
    charts = [svg_line_chart(curves, title="Validation AUC per trial", xlabel="epoch", ylabel="valid AUC")] \
        if curves else []
    for key, spec in search_space(cfg).items():
        log = "loguniform" in spec
        pts = [(trial_params(cfg, r.config).get(key), (r.metrics or {}).get(METRIC)) for r in grid]
        pts = [(math.log10(x) if log else x, y) for x, y in pts if _finite(x) and _finite(y) and (x > 0 or not log)]
        if pts:
            xs, ys = zip(*pts)
            label = f"log10({key})" if log else key
            charts.append(svg_line_chart({key: (list(xs), list(ys))}, title=f"{key} vs best valid AUC",
                                         xlabel=label, ylabel="best valid AUC", lines=False))
    return charts


class TrialProgress(tune.Callback):
    """The search's progress line, drawn by Tune's driver: trials ended of num_samples (running ones count
    by their epochs), the best valid AUC so far."""

    def __init__(self, total: int, epochs: int) -> None:
        self.total, self.epochs = total, epochs
        self.bar: console.Bar | None = None
        self.ended: set[str] = set()
        self.running: dict[str, float] = {}
        self.best = -math.inf

    def _draw(self) -> None:
        self.bar = self.bar or console.Bar("  search", self.total, "trials")
        done = len(self.ended) + sum(min(e / self.epochs, 1.0) for e in self.running.values())
        best = f"best valid AUC {self.best:.4f}" if _finite(self.best) else ""
        self.bar.update(done, f"{len(self.ended)} ended, {len(self.running)} running  {best}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.running[trial.trial_id] = float(result.get(TIME_ATTR) or 0)
        if _finite(result.get(METRIC)):
            self.best = max(self.best, result[METRIC])
        self._draw()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.pop(trial.trial_id, None)
        self.ended.add(trial.trial_id)
        self._draw()

    on_trial_error = on_trial_complete

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close("")


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no trials)"
    cols = list(rows[0])
    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def _csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["trial"])
    w.writeheader()
    w.writerows({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()} for r in rows)
    return out.getvalue()


def _checkpointed(r: Any, cfg: Config) -> tuple[Any, dict] | None:
    """A trial's latest checkpoint and the metrics reported with it: Tune's for a one-worker trial (its
    mid-epoch reports carry none), the Train run's for a several-worker one (its path in every report)."""
    if r.best_checkpoints:
        return max(r.best_checkpoints, key=lambda cm: cm[1].get("training_iteration", 0))
    path = (r.metrics or {}).get(CHECKPOINT_PATH_KEY)
    if not path:
        return None
    _, fs = storage_location(_abs(storage.join(cfg.run_dir, "tune")), cfg)
    return ray.train.Checkpoint(path, filesystem=fs), r.metrics


MIN_BLEND_GAIN = 0.0005  # valid AUC an ensemble must add over the best single trial to be the winner
ENSEMBLE_ROUNDS = 10  # greedy picks (with replacement): each part's weight is a multiple of 1/10
ENSEMBLE_CANDIDATES = 32  # the best trials by valid AUC that may enter the ensemble (a search has fewer)


def _logits(model: Any, x_cat: np.ndarray, x_num: np.ndarray, batch: int = 65536) -> np.ndarray:
    return np.concatenate([forward(model, x_cat[i:i + batch], x_num[i:i + batch], logits=True)
                           for i in range(0, len(x_cat), batch)])


def logit_auc(y: np.ndarray, z: np.ndarray) -> float:
    """ROC AUC of logits (sigmoid by tanh: no overflow, no ties from saturation below |z| ~ 36)."""
    return roc_auc(y, 0.5 * (1 + np.tanh(np.asarray(z, np.float64) / 2)))


def select_ensemble(y: np.ndarray, logits: list[np.ndarray], start: list[int] = (),
                    rounds: int = ENSEMBLE_ROUNDS) -> tuple[list[float], float]:
    """Greedy ensemble selection (Caruana et al., ICML 2004) on valid: from the `start` picks, add `rounds`
    times (with replacement) the trial whose logits make the sum's valid AUC highest; keep the best prefix.
    Returns (each trial's weight: its picks / all picks, the ensemble's valid AUC). With no start the first
    pick is the best single trial, so the ensemble is never worse than it on valid."""
    counts = np.bincount(np.asarray(start, dtype=int), minlength=len(logits)).astype(float)
    total = sum((c * z for c, z in zip(counts, logits) if c), np.zeros(len(y)))
    best = (logit_auc(y, total / counts.sum()), counts.copy()) if counts.any() else (-1.0, counts)
    for _ in range(rounds):
        n = counts.sum() + 1  # the mean logit: the blend's own logit, so its AUC is the served model's
        aucs = [logit_auc(y, (total + z) / n) for z in logits]
        k = int(np.argmax(aucs))
        total, counts[k] = total + logits[k], counts[k] + 1
        if aucs[k] > best[0]:
            best = (aucs[k], counts.copy())
    return [float(c) for c in best[1] / best[1].sum()], float(best[0])


def blend_wins(mode: str, fit: dict[str, Any]) -> bool:
    """`tune.blend`: always (an ensemble of two or more trials), never, or auto: it beats the best single
    trial on valid by MIN_BLEND_GAIN."""
    several = sum(w > 0 for w in fit["weights"]) >= 2
    if mode != "auto":
        return mode == "always" and several
    return several and fit["valid_auc"] >= max(fit["trial_valid_aucs"]) + MIN_BLEND_GAIN


def _valid_auc(rc: tuple[Any, tuple[Any, dict]]) -> float:
    return rc[1][1][METRIC]


def export_winner(cfg: Config, prep: dict, grid: Any, path: str) -> dict[str, Any]:
    """Best valid trial among those with a checkpoint (AUC as of that checkpoint), or the ensemble of the
    best trials (select_ensemble) when it beats it on valid by MIN_BLEND_GAIN: scored on test (the search's
    only pass over test), bundled atomically."""
    ok = [(r, c) for r in grid if r.error is None and (c := _checkpointed(r, cfg)) and _finite(c[1].get(METRIC))]
    if not ok:
        errors = [f"{os.path.basename(r.path or '?')}: {r.error}" for r in grid if r.error is not None]
        raise RuntimeError("no trial checkpointed a validation AUC"
                           + (": " + "; ".join(errors[:3]) if errors else ""))

    def load(rc: tuple[Any, tuple[Any, dict]]) -> dict[str, Any]:
        params = trial_params(cfg, rc[0].config)
        wcfg = trial_config(cfg, params)
        model, arch = best_model(rc[1][0], wcfg, prep["preprocessor"])
        return {"model": model, "arch": arch, "cfg": wcfg, "params": params,
                "trial_id": rc[1][1].get("trial_id"), "valid_auc": _valid_auc(rc),
                "metrics": {k: v for k, v in rc[1][1].items() if _finite(v) or isinstance(v, (str, bool))}}

    ok.sort(key=_valid_auc, reverse=True)
    info: dict[str, Any] = {"search": storage.join(cfg.run_dir, "tune", "search")}
    if len(ok) > 1 and cfg.tune.blend != "never":
        w = _ensemble(cfg, prep, ok[:ENSEMBLE_CANDIDATES], load, info)
    else:
        w = load(ok[0])
    if cfg.tune.refit:
        _refit(prep, w.get("parts", [w]), info)
    info.update(trial_id=w["trial_id"], params=w["params"])
    out = finish(w["cfg"], prep, w["model"], w["arch"], w["metrics"], path, info=info)
    return {"trial_id": w["trial_id"], "params": w["params"], "best_valid_auc": w["valid_auc"],
            "test": {k: v for k, v in out.items() if k.startswith("test_")}}


def _ensemble(cfg: Config, prep: dict, ranked: list, load: Any, info: dict) -> dict[str, Any]:
    """The winner among the `ranked` trials (best valid first): their ensemble when blend_wins, else the
    first; the selection's record goes into the bundle's info["blend"]. Each trial is loaded once for its
    valid logits and dropped; the chosen ones are loaded again (a search's trials need not fit in memory)."""
    with console.step(f"ensemble: greedy selection over the best {len(ranked)} trials, on valid") as st:
        x_cat, x_num, y = read_split(prep["encoded"], "valid", cfg, prep["preprocessor"])
        logits, gbdt, best = [], [], None
        for rc in ranked:
            t = load(rc)
            logits.append(_logits(t["model"], x_cat, x_num))
            gbdt.append(t["cfg"].model.name == GBDT)
            best = best or t  # the best trial is kept: the winner when the ensemble is not
        # `always`: the best trial of each family is in it (then the greedy picks)
        start = [gbdt.index(True), gbdt.index(False)] if cfg.tune.blend == "always" and len(set(gbdt)) == 2 else []
        weights, auc = select_ensemble(y, logits, start)
        fit = {"valid_auc": auc, "weights": weights, "trial_valid_aucs": [_valid_auc(rc) for rc in ranked],
               "trials": [rc[1][1].get("trial_id") for rc in ranked]}
        better = blend_wins(cfg.tune.blend, fit)
        parts = [i for i, wt in enumerate(weights) if wt > 0]
        st["done"] = (f"{len(parts)} of {len(ranked)} trials: valid AUC {auc:.4f} vs best trial "
                      f"{fit['trial_valid_aucs'][0]:.4f}: " + ("the ensemble wins" if better else
                                                             f"not {MIN_BLEND_GAIN} better: the best trial wins"))
    info["blend"] = {**fit, "chosen": better}
    if not better:
        return best
    chosen = [load(ranked[i]) for i in parts]
    ws = [weights[i] for i in parts]
    arch = blend_arch([c["arch"] for c in chosen], ws)
    deep = [c for c in chosen if c["cfg"].model.name != GBDT]
    return {"model": Blend([c["model"] for c in chosen], ws), "arch": arch, "parts": chosen,
            # the bundle's settings are the best deep part's (the arch holds every part)
            "cfg": (deep or chosen)[0]["cfg"],
            "params": {"blend": model_label(arch), **{c["trial_id"]: c["params"] for c in chosen}},
            "trial_id": "blend(" + " + ".join(c["trial_id"] for c in chosen) + ")", "valid_auc": auc,
            "metrics": {METRIC: auc, "final": True}}


def _refit(prep: dict, parts: list[dict[str, Any]], info: dict) -> None:
    """`tune.refit`: each LightGBM part of the winner refit on train + valid (training.gbdt.refit_gbdt) with
    the trees its trial's early stopping chose; deep parts stay as trained. The winner's valid AUC stays the
    one measured before (valid is in-sample after), its test AUC is the refit model's."""
    todo = [p for p in parts if p["cfg"].model.name == GBDT]
    if not todo:
        return
    with console.step(f"refit: {len(todo)} LightGBM part(s) on train + valid") as st:
        done = [{"trial_id": p["trial_id"], **refit_gbdt(p["cfg"], prep["preprocessor"], prep["encoded"], p["model"])}
                for p in todo]
        st["done"] = f"{done[0]['rows']:,} rows, " + ", ".join(f"{d['rounds']} trees" for d in done)
    info["refit"] = done


def winner_path(cfg: Config) -> str:
    return cfg.tune.export_path or storage.join(cfg.run_dir, "winner")


def run_search(cfg: Config, *, restart: bool = False, export_path: str | None = None) -> SearchResult:
    """Prepare once, search, write results (CSV + HTML), export the winner's bundle. A bad space, or a search
    the cluster can never hold, fails before anything is prepared; the autoscaler is asked for its nodes."""
    parse_space(cfg)
    with held(cfg, cfg.tune.max_concurrent_trials):
        return _search(cfg, restart, export_path)


def _search(cfg: Config, restart: bool, export_path: str | None) -> SearchResult:
    t0 = time.time()
    prep = ensure_prepared(cfg)
    cfg = sized(cfg, prep["profile"]["rows_by_split"]["train"])  # "auto" sizes, for every trial alike
    clock, progress = TrialClock(), TrialProgress(cfg.tune.num_samples, cfg.train.epochs)
    console.say(f"search: {cfg.tune.num_samples} trials of up to {cfg.train.epochs} epochs, "
                f"{cfg.tune.max_concurrent_trials} at a time (Optuna TPE + ASHA)")
    grid = make_tuner(cfg, prep, restart=restart, callbacks=[clock, progress]).fit()
    progress.close()
    table = results_table(grid, cfg, clock)
    s3 = s3_options(cfg)
    root = storage.join(cfg.run_dir, "tune")
    csv_path, html_path = storage.join(root, "results.csv"), storage.join(root, "results.html")
    storage.write_text(csv_path, _csv(table), s3)
    bundle = export_path or winner_path(cfg)
    winner = export_winner(cfg, prep, grid, bundle)
    page = results_page(title=f"rankray search: {cfg.run.name}", table=table, charts=_charts(grid, cfg),
                        meta={"run": cfg.run.name, "winner": winner["trial_id"], "bundle": bundle,
                              "winner test AUC": winner["test"].get("test_auc"),
                              "search space": json.dumps(search_space(cfg))})
    storage.write_text(html_path, page, s3)
    storage.write_text(storage.join(root, "config.yaml"), dump_config(cfg), s3)
    return SearchResult(table, winner, bundle, csv_path, html_path, time.time() - t0)
