"""The per-worker training loop (Ray Train V2): stream encoded shards, DDP, exact gathered metrics,
a checkpoint every epoch, resume from the latest one, test metrics with the best weights. It asks its
runner (a `Session`) for rank, device, data, checkpoints and reports: Ray Train's worker API under a
TorchTrainer, Tune's trial API for a search's one-worker trial (`TuneSession`)."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import posixpath
import resource
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.fs as pafs
import ray.train
import ray.train.torch
import ray.tune
import torch
import torch.distributed as dist
from ray.data.collate_fn import ArrowBatchCollateFn
from safetensors.torch import load_file, save_file

from raycluster.config import Config
from training.evalmetrics import compute_metrics
from training.features import GROUP, LABEL, ORACLE, Preprocessor
from training.evaluate import fields_of
from training.models import build_model, model_arch

SPARSE_OPTIMIZERS = ("sparse_adam",)


class Collate(ArrowBatchCollateFn):
    """Arrow batch -> tensors with column-wise numpy (no per-row Python)."""

    def __init__(self, cat_cols: list[str], num_cols: list[str], extras: list[str], pin: bool) -> None:
        self.cat_cols, self.num_cols, self.extras, self.pin = cat_cols, num_cols, extras, pin

    def __call__(self, t: pa.Table) -> dict[str, torch.Tensor]:
        n = t.num_rows
        cat = np.stack([t.column(c).to_numpy() for c in self.cat_cols], 1) if self.cat_cols else np.zeros((n, 0), np.int32)
        num = np.stack([t.column(c).to_numpy() for c in self.num_cols], 1) if self.num_cols else np.zeros((n, 0), np.float32)
        out = {"x_cat": torch.from_numpy(cat), "x_num": torch.from_numpy(num)}
        for c in self.extras:
            if c in t.column_names:
                out[c] = torch.from_numpy(t.column(c).combine_chunks().to_numpy(zero_copy_only=False, writable=True))
        if self.pin:
            out = {k: v.pin_memory() for k, v in out.items()}
        return out


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    best_auc: float = -math.inf
    best_epoch: float = -1.0
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # epoch at each (re)start: shows resumes


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


# ---------------------------------------------------------------- safetensors state (no pickle)
def _flat_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflat_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    m = model.module if hasattr(model, "module") else model
    # clone: on CPU .cpu() is the live parameter itself, and "best" must not follow later steps
    return {k: v.detach().cpu().clone().contiguous() for k, v in m.state_dict().items()}


def save_checkpoint(d: str, model: torch.nn.Module, best: dict[str, torch.Tensor], opts: list, state: TrainState,
                    arch: dict) -> None:
    save_file(_weights(model), os.path.join(d, "model.safetensors"))
    save_file(best, os.path.join(d, "best.safetensors"))
    metas = []
    for i, opt in enumerate(opts):
        tensors, meta = _flat_optimizer(opt)
        save_file(tensors, os.path.join(d, f"optimizer{i}.safetensors"))
        metas.append(meta)
    with open(os.path.join(d, "state.json"), "w") as f:
        json.dump({"state": asdict(state), "optimizers": metas, "arch": arch}, f)
    write_manifest(d)  # last: a checkpoint without it, or whose files differ from it, is never loaded


MANIFEST = "manifest.json"
REQUIRED_FILES = ("model.safetensors", "best.safetensors", "state.json")


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete or damaged (e.g. its writer or copy was killed mid-write)."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(d: str) -> None:
    files = {n: {"sha256": _sha256(os.path.join(d, n)), "bytes": os.path.getsize(os.path.join(d, n))}
             for n in sorted(os.listdir(d)) if n != MANIFEST and os.path.isfile(os.path.join(d, n))}
    with open(os.path.join(d, MANIFEST), "w") as f:
        json.dump({"files": files}, f, indent=1)


def verify_checkpoint(d: str) -> dict:
    """The checkpoint's manifest, once every file it lists is there with its size and sha256; else
    CheckpointError."""
    try:
        with open(os.path.join(d, MANIFEST)) as f:
            files = json.load(f)["files"]
    except FileNotFoundError:
        raise CheckpointError(f"no {MANIFEST}: incomplete checkpoint") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"unreadable {MANIFEST}: {e}") from None
    missing = [n for n in REQUIRED_FILES if n not in files]
    if missing:
        raise CheckpointError(f"{MANIFEST} lists no {', '.join(missing)}")
    for name, want in files.items():
        path = os.path.join(d, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{name}: missing")
        if os.path.getsize(path) != want["bytes"] or _sha256(path) != want["sha256"]:
            raise CheckpointError(f"{name}: checksum mismatch")
    return files


def load_checkpoint(d: str, model: torch.nn.Module, opts: list, arch: dict) -> tuple[TrainState, dict[str, torch.Tensor]]:
    verify_checkpoint(d)  # before anything is loaded: a refused checkpoint leaves model and optimizers as they were
    with open(os.path.join(d, "state.json")) as f:
        meta = json.load(f)
    if meta["arch"] != arch:
        raise ValueError("the run's checkpoint holds a different model architecture than the config asks for; "
                         "use a new run.name (or delete the old run) to train this model")
    model.load_state_dict(load_file(os.path.join(d, "model.safetensors")))
    for i, opt in enumerate(opts):
        opt.load_state_dict(_unflat_optimizer(load_file(os.path.join(d, f"optimizer{i}.safetensors")), meta["optimizers"][i]))
    return TrainState(**meta["state"]), load_file(os.path.join(d, "best.safetensors"))


def _older_checkpoints(ckpt: ray.train.Checkpoint) -> list[ray.train.Checkpoint]:
    """The run's other checkpoint directories older than `ckpt`, newest first (names are timestamps)."""
    fs, parent, name = ckpt.filesystem, posixpath.dirname(ckpt.path), posixpath.basename(ckpt.path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
    except OSError:
        return []
    names = sorted((posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory), reverse=True)
    return [ray.train.Checkpoint(path=posixpath.join(parent, n), filesystem=fs)
            for n in names if n.startswith("checkpoint_") and n < name]


def restore(ckpt: ray.train.Checkpoint, model: torch.nn.Module, opts: list,
            arch: dict) -> tuple[TrainState, dict[str, torch.Tensor], str, list[str]]:
    """Load the checkpoint Ray hands over or, when its files do not match its manifest (a write or copy
    killed part way), the newest older complete one of the run. Returns (state, best weights, the
    checkpoint's name, the refused ones with reasons)."""
    refused = []
    for cand in [ckpt, *_older_checkpoints(ckpt)]:
        name = posixpath.basename(cand.path)
        try:
            with cand.as_directory() as d:
                state, best = load_checkpoint(d, model, opts, arch)
            return state, best, name, refused
        except CheckpointError as e:
            refused.append(f"{name}: {e}")
    raise CheckpointError("no complete checkpoint to resume from (delete the run or use a new run.name): "
                          + "; ".join(refused))


# ---------------------------------------------------------------- pieces of the loop
def make_optimizers(model: torch.nn.Module, cfg: Config) -> list[torch.optim.Optimizer]:
    t = cfg.train
    if t.optimizer == "adagrad":
        return [torch.optim.Adagrad(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)]
    if t.optimizer == "sparse_adam":  # sparse embedding rows updated lazily: big tables stay cheap
        sparse = [p for n, p in model.named_parameters() if _is_sparse_param(model, n)]
        dense = [p for n, p in model.named_parameters() if not _is_sparse_param(model, n)]
        opts: list[torch.optim.Optimizer] = [torch.optim.SparseAdam(sparse, lr=t.lr)] if sparse else []
        return opts + [torch.optim.AdamW(dense, lr=t.lr, weight_decay=t.weight_decay)]
    return [torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)]


def _is_sparse_param(model: torch.nn.Module, name: str) -> bool:
    mod = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return isinstance(mod, torch.nn.Embedding) and mod.sparse


def gather(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenate every worker's arrays on every worker: metrics over ALL rows, not rank 0's."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return arrays
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, arrays)
    return {k: np.concatenate([p[k] for p in parts]) for k in arrays}


CHUNK_ROWS = 32768  # rows per Ray Data batch (chunk), at least: a whole number of loop batches


def oov_dropout(x_cat: torch.Tensor, p: float) -> torch.Tensor:
    """Training only: each known id (> 1) becomes the out-of-vocabulary id 1 with probability p, so the
    OOV rows of the tables learn what an unseen user/item looks like. Without it they stay at their
    random start, and a time split's new users and items (91% of MovieLens test rows have a user
    unseen in training) are scored with noise: +0.010 test AUC there, +0.001 on the demo data."""
    if p <= 0:
        return x_cat
    drop = (torch.rand(x_cat.shape, device=x_cat.device) < p) & (x_cat > 1)
    return x_cat.masked_fill(drop, 1)


def _pinned_like(src: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return t.pin_memory() if src.is_pinned() else t


def iter_batches(shard: Any, collate: Collate, batch_size: int, shuffle_rows: int = 0,
                 seed: int | None = None) -> Any:
    """Batches of `batch_size` rows as tensors. Ray Data hands over chunks of many batches (one
    collate and one round of Ray's per-batch work per chunk, not per batch), cut here into views.
    With `shuffle_rows`, chunks hold at least that many rows and each chunk's rows are permuted
    (seeded): the local shuffle, done as one tensor gather per chunk instead of a row-by-row take
    over Arrow columns per batch. Only the last batch of the pass can be short, as before."""
    rows = max(shuffle_rows, CHUNK_ROWS, batch_size)
    chunk = -(-rows // batch_size) * batch_size
    gen = torch.Generator().manual_seed(seed or 0) if shuffle_rows else None
    for c in shard.iter_torch_batches(batch_size=chunk, collate_fn=collate, device="cpu", prefetch_batches=1):
        n = len(c["x_cat"])
        if gen is not None:
            perm = torch.randperm(n, generator=gen)
            c = {k: _pinned_like(v, v.index_select(0, perm)) for k, v in c.items()}  # ~5x faster than v[perm]
        for s in range(0, n, batch_size):
            yield {k: v[s:s + batch_size] for k, v in c.items()}


def predict(model: torch.nn.Module, shard: Any, collate: Collate, batch_size: int, device: torch.device,
            autocast: Any) -> dict[str, np.ndarray]:
    """Scores of every row of the shard, in compact dtypes (p float32): the valid split is scored
    several times per epoch and its size grows with the data."""
    model.eval()
    out: dict[str, list[np.ndarray]] = {"p": [], "y": [], "g": [], "o": []}
    with torch.no_grad():
        for b in iter_batches(shard, collate, batch_size):
            with autocast():
                logits = model(b["x_cat"].to(device, non_blocking=True), b["x_num"].to(device, non_blocking=True))
            out["p"].append(torch.sigmoid(logits.float()).cpu().numpy())
            out["y"].append(b[LABEL].numpy())
            if GROUP in b:
                out["g"].append(b[GROUP].numpy())
            if ORACLE in b:
                out["o"].append(b[ORACLE].numpy())
    model.train()
    return {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in out.items()}


def metrics_of(pred: dict[str, np.ndarray], prefix: str) -> dict[str, float]:
    if len(pred["y"]) == 0:
        raise ValueError(f"the {prefix} split has no rows")
    m = compute_metrics(pred["y"], np.clip(pred["p"], 0.0, 1.0), group=pred["g"] if len(pred["g"]) else None,
                        p_true=pred["o"] if len(pred["o"]) else None)
    return {f"{prefix}_{k}": v for k, v in m.items()}


# ---------------------------------------------------------------- the loop
class Session:
    """Ray Train's worker API, what the loop runs under in a TorchTrainer (any number of workers)."""

    def __init__(self) -> None:
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def checkpoint(self) -> Any:
        return ray.train.get_checkpoint()

    def shard(self, name: str) -> Any:
        return ray.train.get_dataset_shard(name)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(model) if self.world > 1 or self.device.type == "cuda" else model

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir)
                         if checkpoint_dir else None)

    def progress(self, metrics: dict) -> None:
        """A mid-epoch evaluation's metrics. Train's runs report at epoch ends only (with a checkpoint)."""


class TuneSession(Session):
    """One worker inside a Tune trial's own process: no Train controller, worker and data actors to start
    (each a new process: ~8 s of every trial on 2 cores), and Tune reuses the process for the next trial.
    Checkpoints go to the trial's directory; a retried or restored trial resumes from its latest."""

    def __init__(self, datasets: dict[str, Any], use_gpu: bool) -> None:
        self.rank, self.world = 0, 1
        self.device = torch.device("cuda" if use_gpu else "cpu")  # Ray shows the trial its own GPU only
        self.datasets = datasets
        # Ray Data logs every pass's end at INFO; a Train worker keeps that out of the job log, so here too
        logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(logging.WARNING)

    def checkpoint(self) -> Any:
        return ray.tune.get_checkpoint()

    def shard(self, name: str) -> Any:
        return self.datasets[name]

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model  # one worker, already on its device: no DDP

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(checkpoint_dir)
                        if checkpoint_dir else None)

    def progress(self, metrics: dict) -> None:
        """To Tune, so ASHA's rungs inside the first epoch (grace 0.25) stop weak trials there."""
        ray.tune.report(metrics)


def train_loop(config: dict) -> None:
    """TorchTrainer's per-worker function."""
    run_loop(config, Session())


def run_loop(config: dict, session: Session) -> None:
    cfg = Config.model_validate(config["cfg"])
    pp = Preprocessor.from_json(config["pp"])
    t = cfg.train
    torch.manual_seed(t.seed)
    torch.set_num_threads(t.torch_threads or max(1, math.ceil(t.cpus_per_worker)))
    device = session.device
    _, precision = resolve_device(cfg)
    on_gpu = device.type == "cuda"
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    fields, n_num = fields_of(pp), len(pp.num_columns)
    arch = model_arch(cfg.model, fields, n_num)
    # on its device before the optimizers: their state (Adagrad's at once, any restored one) follows it
    model = build_model(cfg.model, fields, n_num, sparse=t.optimizer in SPARSE_OPTIMIZERS).to(device)
    opts = make_optimizers(model, cfg)
    state, best = TrainState(), _weights(model)
    ckpt = session.checkpoint()
    resumed_from, refused = "", []
    if ckpt:
        state, best, resumed_from, refused = restore(ckpt, model, opts, arch)
    state.starts.append(state.epoch)
    model = session.prepare(model)
    collate = Collate(pp.cat_columns, pp.num_columns, [LABEL, GROUP, ORACLE], pin=on_gpu)
    train_collate = Collate(pp.cat_columns, pp.num_columns, [LABEL], pin=on_gpu)  # steps need no group/oracle
    loss_fn = torch.nn.BCEWithLogitsLoss()
    log = (lambda msg: print(f"[rankray train] {msg}", flush=True)) if session.rank == 0 else (lambda msg: None)
    for r in refused:
        log(f"refused checkpoint {r}")
    if state.starts[-1] > 0:
        log(f"resumed from the checkpoint of epoch {state.epoch} ({resumed_from})")

    # train.batch_size is the global batch: results do not change with the number of workers
    batch = max(1, t.batch_size // session.world)
    steps_per_epoch = max(1, config["train_rows"] // session.world // batch)
    mid_evals = {round(k * steps_per_epoch / t.evals_per_epoch) for k in range(1, t.evals_per_epoch)}

    eval_seconds = 0.0  # per epoch: evaluation time, kept out of train_seconds

    def evaluate(at: float) -> dict[str, float]:
        """Valid metrics over all workers' rows; keeps the best weights. Same result on every rank."""
        nonlocal best, eval_seconds
        start = time.time()
        metrics = metrics_of(gather(predict(model, session.shard("valid"), collate,
                                            batch * 4, device, autocast)), "valid")
        if metrics["valid_auc"] > state.best_auc:
            state.best_auc, state.best_epoch, state.bad_epochs = metrics["valid_auc"], at, 0
            best = _weights(model)
        else:
            state.bad_epochs += 1
        log(f"eval at epoch {at:.2f}: valid AUC {metrics['valid_auc']:.4f} (best {state.best_auc:.4f})")
        eval_seconds += time.time() - start
        return metrics

    first_step_at = 0.0  # wall clock of this start's first step: fixed cost of a (trial) start
    peak_uss = 0  # private memory: RSS also counts object-store pages the worker has read through
    while state.epoch < t.epochs and state.bad_epochs < t.patience:
        epoch = state.epoch + 1
        shard = session.shard("train")
        t0, seen, total_loss, steps, eval_seconds = time.time(), 0, 0.0, 0, 0.0
        tick, tick_seen = t0, 0
        for b in iter_batches(shard, train_collate, batch, t.shuffle_buffer, t.seed * 1_000_003 + epoch):
            x_cat = oov_dropout(b["x_cat"].to(device, non_blocking=True), t.oov_dropout)
            x_num = b["x_num"].to(device, non_blocking=True)
            y = b[LABEL].to(device, non_blocking=True)
            with autocast():
                logits = model(x_cat, x_num)
            loss = loss_fn(logits.float(), y)
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            if t.grad_clip:
                dense = [p for p in model.parameters() if p.grad is not None and not p.grad.is_sparse]
                torch.nn.utils.clip_grad_norm_(dense, t.grad_clip)
            for o in opts:
                o.step()
            steps += 1
            first_step_at = first_step_at or time.time()
            seen += len(y)
            total_loss += float(loss.detach())
            if steps % t.log_every == 0:
                peak_uss = max(peak_uss, psutil.Process().memory_full_info().uss)
                now = time.time()
                log(f"epoch {epoch} step {steps} loss {total_loss / steps:.4f} "
                    f"samples/s {(seen - tick_seen) / max(now - tick, 1e-9):,.0f} (rank 0)")
                tick, tick_seen = now, seen
            if steps in mid_evals:  # equal shards: every rank reaches the same step, so DDP stays in step
                at = state.epoch + steps / steps_per_epoch
                session.progress({**evaluate(at), "epoch": at, "best_valid_auc": state.best_auc,
                                  "first_step_at": first_step_at, "final": False})
                model.train()
                tick, tick_seen = time.time(), seen  # the step log's samples/s leaves evaluation out too
                if state.bad_epochs >= t.patience:
                    break
        # training time only: mid-epoch evaluations are timed apart (eval_seconds)
        train_seconds = time.time() - t0 - eval_seconds
        metrics = evaluate(float(epoch)) if state.bad_epochs < t.patience else {}
        state.epoch = epoch
        seen_all = int(gather({"n": np.array([seen])})["n"].sum())  # throughput of all workers together
        row = {"epoch": epoch, "train_loss": total_loss / max(steps, 1), "train_seconds": train_seconds,
               "samples_per_s": seen_all / max(train_seconds, 1e-9), "eval_seconds": eval_seconds, **metrics}
        state.history.append(row)
        log(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        _report({**row, "best_valid_auc": state.best_auc, "first_step_at": first_step_at, "final": False},
                session, model, best, opts, state, arch)

    # test with the best weights, over all workers' rows
    m = model.module if hasattr(model, "module") else model
    m.load_state_dict(best)
    test = metrics_of(gather(predict(model, session.shard("test"), collate, batch * 4,
                                     device, autocast)), "test")
    log(" ".join(f"{k} {v:.4f}" for k, v in test.items()))
    peak_uss = max(peak_uss, psutil.Process().memory_full_info().uss)
    mem = gather({"rss": np.array([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0]),
                  "uss": np.array([peak_uss / 2**20])})
    final = {**test, "worker_peak_rss_mb": float(mem["rss"].max()), "worker_peak_uss_mb": float(mem["uss"].max()),
             "best_valid_auc": state.best_auc,
             "best_epoch": state.best_epoch, "epochs_run": state.epoch,
             "stopped_early": state.epoch < t.epochs, "epoch": state.epoch, "first_step_at": first_step_at,
             "final": True, "history": json.dumps(state.history),
             "starts": json.dumps(state.starts), "resumed_from": resumed_from,
             "refused_checkpoints": json.dumps(refused)}
    _report(final, session, model, best, opts, state, arch)


def _report(metrics: dict, session: Session, model: torch.nn.Module, best: dict, opts: list, state: TrainState,
            arch: dict) -> None:
    with tempfile.TemporaryDirectory() as d:
        if session.rank == 0:
            save_checkpoint(d, model, best, opts, state, arch)
        session.report(metrics, d if session.rank == 0 else None)
