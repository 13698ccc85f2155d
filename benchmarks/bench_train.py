"""Training and reader throughput, side by side on the same model and encoded data.

    python benchmarks/bench_train.py --config configs/demo.yaml

Prints samples/s of (a) a bare single-process PyTorch loop over in-memory tensors (the limit),
(b) `rankray train` with one worker and (c) with two; and rows/s of the encoded-data reader
(Ray Data + rankray's collate) vs raw pyarrow reading the same files into the same two tensors.
Targets on the 2-core dev machine: one worker >= 0.9x the bare loop; reader >= 0.8x raw pyarrow.
"""
from __future__ import annotations

import argparse
import glob
import os
import time

import raycluster  # noqa: F401 - token auth before ray is imported
import numpy as np
import pyarrow.parquet as pq
import ray
import torch

from raycluster.config import Config, config_with, load_config
from training.evaluate import fields_of
from training.features import LABEL
from training.loop import Collate, make_optimizers
from training.models import build_model
from training.prepare import encoded_datasets, ensure_prepared
from training.trainer import train


def bare_loop(cfg: Config, pp, files: list[str], threads: int, seconds: float) -> float:
    """The limit: tensors already in memory, one process, no Ray."""
    torch.set_num_threads(threads)
    t = pq.read_table(files)
    cat, num = pp.pack({c: t.column(c).to_numpy() for c in pp.cat_columns + pp.num_columns})
    x_cat, x_num = torch.from_numpy(cat), torch.from_numpy(num)
    y = torch.from_numpy(t.column(LABEL).to_numpy())
    torch.manual_seed(0)
    model = build_model(cfg.model, fields_of(pp), len(pp.num_columns))
    opts = make_optimizers(model, cfg)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    bs, n, seen, start = cfg.train.batch_size, len(y), 0, None
    i = 0
    while True:
        if i == 3:  # skip warm-up steps
            start, seen = time.time(), 0
        s = (i * bs) % (n - bs)
        loss = loss_fn(model(x_cat[s:s + bs], x_num[s:s + bs]), y[s:s + bs])
        for o in opts:
            o.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        for o in opts:
            o.step()
        seen += bs
        i += 1
        if start and time.time() - start > seconds:
            return seen / (time.time() - start)


def raw_reader(pp, files: list[str], batch: int) -> float:
    t0, rows = time.time(), 0
    for f in files:
        for b in pq.ParquetFile(f).iter_batches(batch_size=batch, columns=pp.cat_columns + pp.num_columns + [LABEL]):
            cat = torch.from_numpy(np.stack([b.column(c).to_numpy() for c in pp.cat_columns], 1))
            num = torch.from_numpy(np.stack([b.column(c).to_numpy() for c in pp.num_columns], 1))
            rows += len(cat) + 0 * len(num)
    return rows / (time.time() - t0)


def ray_reader(cfg: Config, pp, encoded: str, batch: int, materialized: bool) -> float:
    """Rows/s of one pass of the training iterator (Ray Data + collate); with `materialized`, the
    pass after the one that loaded the object store (what every epoch after the first sees)."""
    ds = encoded_datasets(encoded, cfg)["train"]
    if materialized:
        ds = ds.materialize()
    collate = Collate(pp.cat_columns, pp.num_columns, [LABEL], pin=False)
    t0, rows = time.time(), 0
    for b in ds.iter_torch_batches(batch_size=batch, collate_fn=collate, device="cpu", prefetch_batches=2):
        rows += len(b["x_cat"])
    return rows / (time.time() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--epochs", type=int, default=2, help="epochs per Ray Train run (the best epoch's rate counts)")
    ap.add_argument("--bare-seconds", type=float, default=30.0)
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.set + ["train.patience=100"])
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    prep = ensure_prepared(cfg)
    pp, encoded = prep["preprocessor"], prep["encoded"]
    files = sorted(glob.glob(os.path.join(encoded, "split=train", "*.parquet")))
    cores = os.cpu_count() or 1
    raw = raw_reader(pp, files, cfg.data.batch_size)
    streamed = ray_reader(cfg, pp, encoded, cfg.data.batch_size, materialized=False)
    via_ray = ray_reader(cfg, pp, encoded, cfg.data.batch_size, materialized=True)
    bare = bare_loop(cfg, pp, files, cores, args.bare_seconds)
    rates = {}
    for workers in (1, 2):
        run = config_with(cfg, {"train.num_workers": workers, "train.epochs": args.epochs,
                                "train.cpus_per_worker": (cores - 1) / workers if workers > 1 else 1.0,
                                "train.torch_threads": max(1, cores // workers),
                                "train.storage_path": f"/tmp/rankray-bench-{time.time_ns()}"})
        res = train(run, run_name=f"bench-{workers}w", write_bundle=False)
        rates[workers] = max(h["samples_per_s"] for h in __import__("json").loads(res.metrics["history"]))
    ray.shutdown()
    print(f"machine: {cores} CPUs, torch {torch.__version__}, model {cfg.model.name}, batch {cfg.train.batch_size}")
    print(f"{'path':<44} {'rate':>14} {'vs limit':>9}")
    print(f"{'bare PyTorch loop, in-memory tensors':<44} {bare:>12,.0f}/s {1.0:>8.2f}x")
    for w in (1, 2):
        print(f"{f'rankray train, {w} worker(s) (best epoch)':<44} {rates[w]:>12,.0f}/s {rates[w] / bare:>8.2f}x")
    print(f"{'raw pyarrow reader -> tensors (rows)':<44} {raw:>12,.0f}/s {1.0:>8.2f}x")
    print(f"{'Ray Data reader + collate, streamed (rows)':<44} {streamed:>12,.0f}/s {streamed / raw:>8.2f}x")
    print(f"{'Ray Data reader + collate, materialized':<44} {via_ray:>12,.0f}/s {via_ray / raw:>8.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
