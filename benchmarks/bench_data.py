"""Data-layer throughput: synthetic generation and fit + encode, in rows/s.

    python benchmarks/bench_data.py --rows 10000000 --out data/mk10m

Targets on the 2-core dev machine: 10M rows generated in < 60 s, fit + encode of 10M rows in < 120 s.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import raycluster

raycluster.use_token_auth()  # before ray is imported
import ray

from training.config import load_config
from training.prepare import prepare
from training.synth import generate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--out", default="data/mk10m")
    ap.add_argument("--config", default="configs/demo.yaml", help="feature spec used for fit + encode")
    ap.add_argument("--shards", type=int, default=16)
    args = ap.parse_args(argv)
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        g = generate(args.rows, args.out, seed=0, shards=args.shards)
        with tempfile.TemporaryDirectory() as runs:
            cfg = load_config(args.config, [f"data.source={os.path.abspath(args.out)}", "data.generate=null",
                                            f"run.dir={runs}", "run.name=bench"])
            t = time.time()
            res = prepare(cfg)
            fit_encode = time.time() - t
    finally:
        ray.shutdown()
    print(f"machine: {os.cpu_count()} CPUs")
    print(f"generate     {g['rows']:>12,} rows  {g['seconds']:7.1f} s  {g['rows'] / g['seconds']:>12,.0f} rows/s"
          f"   (target < 60 s for 10M)  base rate {g['base_rate']:.4f}  Bayes AUC {g['bayes_auc_test']:.4f}")
    print(f"fit + encode {res['profile']['rows']:>12,} rows  {fit_encode:7.1f} s  "
          f"{res['profile']['rows'] / fit_encode:>12,.0f} rows/s   (target < 120 s for 10M; "
          f"fit {res['fit_seconds']:.1f} s, encode {res['encode_seconds']:.1f} s)")
    print(f"HEADLINE | synthetic generation, {g['rows']:,} rows | {g['seconds']:.1f} s ({g['rows'] / g['seconds']:,.0f} rows/s)")
    print(f"HEADLINE | fit + encode, {res['profile']['rows']:,} rows | {fit_encode:.1f} s (fit {res['fit_seconds']:.1f} s, "
          f"encode {res['encode_seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
