"""Peak memory of a training worker as data grows: streaming, not collecting.

    python benchmarks/bench_memory.py --rows 1000000 10000000

Trains one epoch of the demo model on each size with `data.materialize=false` (pure streaming from
the encoded Parquet shards) and prints each run's worker peak private memory (USS) and peak RSS, with
the ratio to the smallest run.
Target: the 10M-row run uses no more than 1.3x the peak of the 1M-row run.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import raycluster

raycluster.use_token_auth()  # before ray is imported
import ray

from training.config import load_config
from training.synth import generate
from training.trainer import train


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--vocab-cap", nargs="*", default=["user_id=25000", "job_id=10000"], metavar="FEATURE=N",
                    help="max_vocab per feature so the model is the same size at every data size (synthetic "
                         "users and jobs grow with rows); pass no values to let the model grow too")
    args = ap.parse_args(argv)
    base_cfg = load_config(args.config)
    names = [f.name for f in base_cfg.features.features]
    caps = [f"features.features.{names.index(k)}.max_vocab={v}" for k, v in (c.split("=") for c in args.vocab_cap)]
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.rows:
            src = os.path.join(tmp, f"gen{rows}")
            generate(rows, src, seed=0, shards=16)
            cfg = load_config(args.config, [f"data.source={src}", "data.generate=null", "data.materialize=false",
                                            f"run.dir={tmp}/runs", f"run.name=mem{rows}", "train.epochs=1",
                                            "train.evals_per_epoch=1", f"train.storage_path={tmp}/ckpt", *caps])
            res = train(cfg, write_bundle=False)
            peaks[rows] = (res.metrics["worker_peak_uss_mb"], res.metrics["worker_peak_rss_mb"])
    ray.shutdown()
    base = peaks[min(peaks)]
    print(f"machine: {os.cpu_count()} CPUs; one train worker, streaming (data.materialize=false); "
          f"vocabulary caps: {' '.join(args.vocab_cap) or 'none (the model grows with the data)'}")
    print("private = USS sampled every log_every steps; RSS also counts object-store pages read through")
    for rows, (uss, rss) in sorted(peaks.items()):
        print(f"{rows:>12,} rows  worker peak private {uss:7.0f} MB ({uss / base[0]:4.2f}x)"
              f"  peak RSS {rss:7.0f} MB ({rss / base[1]:4.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
