"""Training and reader throughput, side by side on the same model and encoded data.

    python benchmarks/bench_train.py --config configs/demo.yaml

Prints samples/s of (a) a bare single-process PyTorch loop over in-memory tensors (the limit;
measured before and after the Ray runs, the faster counts), (b) `rankray train` with one worker,
with and without the local shuffle buffer, and (c) with two workers: the loop's per-epoch
`samples_per_s`, which leaves evaluation out; and rows/s of the training reader (the split from
`encoded_datasets`, a `streaming_split` shard, the loop's `iter_batches` + collate + shuffle)
streamed and materialized vs raw pyarrow reading the same files into the same tensors.
Targets on the 2-core dev machine: one worker >= 0.9x the bare loop; reader >= 0.8x raw pyarrow.
Bigger data: --set data.source=data/generated/demo4m --set data.generate.rows=4000000
--set run.name=demo4m (generated and prepared on first use); --reader-only skips training.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import time

import raycluster

raycluster.use_token_auth()  # before ray is imported
import numpy as np
import pyarrow.parquet as pq
import ray
import torch

from training.config import Config, config_with, load_config
from training.features import LABEL
from training.loop import make_optimizers
from training.models import build_model
from training.prepare import ensure_prepared
from training.reader import Collate, encoded_datasets, iter_batches
from training.scoring import fields_of
from training.sizing import sized
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
    """The limit: pyarrow reading the same files, one process, into the same three tensors."""
    t0, rows = time.time(), 0
    for f in files:
        for b in pq.ParquetFile(f).iter_batches(batch_size=batch, columns=pp.cat_columns + pp.num_columns + [LABEL]):
            cat = torch.from_numpy(np.stack([b.column(c).to_numpy() for c in pp.cat_columns], 1))
            num = torch.from_numpy(np.stack([b.column(c).to_numpy() for c in pp.num_columns], 1))
            y = torch.from_numpy(b.column(LABEL).to_numpy(zero_copy_only=False, writable=True))
            rows += len(cat) + 0 * len(num) + 0 * len(y)
    return rows / (time.time() - t0)


def ray_reader(cfg: Config, prep: dict, batch: int, materialized: bool) -> float:
    """Rows/s of one pass of the training reader, as a train worker runs it: the split from
    `encoded_datasets`, a `streaming_split` shard (what `get_dataset_shard` returns) and the loop's
    `iter_batches` with its collate and local shuffle. With `materialized`, the pass after the one
    that loaded the object store. Either way the second pass through the same shard counts: what
    every epoch after the first sees (the first also starts the split's coordinator, ~1 s)."""
    pp = prep["preprocessor"]
    run = config_with(cfg, {"data.materialize": materialized})
    ds = encoded_datasets(prep["encoded"], run, prep)["train"]
    shard = ds.streaming_split(1, equal=True)[0]
    collate = Collate(pp, [LABEL], pin=False)
    rates = []
    for epoch in range(2):
        t0, rows = time.time(), 0
        for b in iter_batches(shard, collate, batch, cfg.train.shuffle_buffer, epoch):
            rows += len(b["x_cat"])
        rates.append(rows / (time.time() - t0))
    return rates[-1]


def train_rate(cfg: Config, workers: int, epochs: int, cores: int, extra: dict | None = None) -> tuple[float, float]:
    """Best epoch's training samples/s (evaluation excluded by the loop) and its evaluation seconds."""
    run = config_with(cfg, {"train.num_workers": workers, "train.epochs": epochs,
                            "train.cpus_per_worker": (cores - 1) / workers if workers > 1 else 1.0,
                            "train.torch_threads": max(1, cores // workers),
                            "train.storage_path": f"/tmp/rankray-bench-{time.time_ns()}", **(extra or {})})
    res = train(run, run_name=f"bench-{workers}w-{time.time_ns()}", write_bundle=False)
    best = max(json.loads(res.metrics["history"]), key=lambda h: h["samples_per_s"])
    return best["samples_per_s"], best.get("eval_seconds", float("nan"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--epochs", type=int, default=2, help="epochs per Ray Train run (the best epoch's rate counts)")
    ap.add_argument("--bare-seconds", type=float, default=20.0, help="per bare-loop measurement (two: before and after)")
    ap.add_argument("--reader-only", action="store_true", help="only the reader figures")
    ap.add_argument("--no-shuffle-run", action="store_true", help="skip the 1-worker run with train.shuffle_buffer=0")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.set + ["train.patience=100"])
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    prep = ensure_prepared(cfg)
    cfg = sized(cfg, prep["profile"]["rows_by_split"]["train"])  # the batch size rankray train would take
    pp, encoded = prep["preprocessor"], prep["encoded"]
    files = sorted(glob.glob(os.path.join(encoded, "split=train", "*.parquet")))
    cores = os.cpu_count() or 1
    batch = cfg.train.batch_size  # one worker's batch: what the loop asks the reader for
    readers = []
    for _ in range(2):  # twice, interleaved: the machine is shared and figures move run to run
        raw = raw_reader(pp, files, batch)
        readers.append((raw, ray_reader(cfg, prep, batch, materialized=False),
                        ray_reader(cfg, prep, batch, materialized=True)))
    rates: dict[str, tuple[float, float]] = {}
    bare = []
    if not args.reader_only:
        bare.append(bare_loop(cfg, pp, files, cores, args.bare_seconds))
        rates["rankray train, 1 worker"] = train_rate(cfg, 1, args.epochs, cores)
        if not args.no_shuffle_run:
            rates["rankray train, 1 worker, shuffle_buffer 0"] = train_rate(cfg, 1, args.epochs, cores,
                                                                            {"train.shuffle_buffer": 0})
        rates["rankray train, 2 workers (DDP)"] = train_rate(cfg, 2, args.epochs, cores)
        bare.append(bare_loop(cfg, pp, files, cores, args.bare_seconds))
    ray.shutdown()
    print(f"machine: {cores} CPUs, torch {torch.__version__}, model {cfg.model.name}, batch {batch}, "
          f"shuffle_buffer {cfg.train.shuffle_buffer}, {prep['profile']['rows_by_split']['train']:,} train rows "
          f"in {len(files)} files")
    if bare:
        limit = max(bare)  # the faster of the two: the less disturbed measurement of the limit
        print(f"{'path':<50} {'rate':>14} {'vs limit':>9}")
        print(f"{'bare PyTorch loop, in-memory tensors':<50} {limit:>12,.0f}/s {1.0:>8.2f}x"
              f"   (before/after: {bare[0]:,.0f} / {bare[1]:,.0f})")
        for name, (rate, ev) in rates.items():
            print(f"{name + ' (best epoch)':<50} {rate:>12,.0f}/s {rate / limit:>8.2f}x   (eval {ev:.1f} s/epoch, excluded)")
        one, two = rates["rankray train, 1 worker"][0], rates["rankray train, 2 workers (DDP)"][0]
        print(f"HEADLINE | `rankray train` 1 worker / 2 workers vs a bare PyTorch loop (evaluation excluded) | "
              f"{one / limit:.2f}x / {two / limit:.2f}x ({one:,.0f} / {two:,.0f} vs {limit:,.0f} samples/s)")
    print(f"{'reader, rows/s':<50} {'raw pyarrow':>14} {'streamed':>16} {'materialized':>16}")
    for i, (raw, streamed, mat) in enumerate(readers):
        print(f"{f'pass {i + 1}':<50} {raw:>12,.0f}/s {streamed:>10,.0f}/s {streamed / raw:4.2f}x "
              f"{mat:>10,.0f}/s {mat / raw:4.2f}x")
    if len(readers) == 2:
        (r1, s1, m1), (r2, s2, m2) = readers
        print(f"HEADLINE | encoded reader vs raw pyarrow, pass 1 / 2: materialized; streamed | "
              f"{m1 / r1:.2f}x / {m2 / r2:.2f}x; {s1 / r1:.2f}x / {s2 / r2:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
