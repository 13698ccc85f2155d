"""Helpers of benchmarks/gpu_e2e.sh (the GPU end-to-end run): the served-vs-offline check and the summary.

    python benchmarks/gpu_e2e.py check --url URL --bundle DIR --data PARQUET_DIR [--rows 512]
    python benchmarks/gpu_e2e.py summary --bundle DIR --run-dir RUN_DIR --train-wall S --model-only RATE [--nproc N] ...

`check` posts the bundle's sample rows and `--rows` raw rows of the source data to the served app's /predict
(serving/client.py) and compares each score with the offline score of the same row (training.scoring.score_rows
on the bundle loaded here, the path evaluation and `rankray score` take) and, for the samples, with the scores
recorded in samples.json at training time. Exit 1 when any differs by more than --tol.
`summary` reads the bundle's metrics.json (rows, epochs run, per-epoch loop samples/s) and prints samples/s end
to end (train rows x epochs run / the `rankray train` command's wall seconds) next to the model-only rate.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np


def check(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from serving.client import model_info, predict
    from training.bundle import load_bundle
    from training.scoring import score_rows

    pp, model, meta = load_bundle(args.bundle)
    cols = list(pp.input_columns)
    samples, recorded = meta["samples"]["rows"], np.asarray(meta["samples"]["scores"], np.float64)
    files = sorted(glob.glob(os.path.join(args.data, "**", "*.parquet"), recursive=True))
    raw = pq.ParquetFile(files[-1]).read_row_group(0, columns=cols).slice(0, args.rows).to_pylist() if files else []
    rows = [{c: r.get(c) for c in cols} for r in samples] + raw
    served = np.asarray(predict(args.url, rows, timeout=60.0), np.float64)
    offline = score_rows(pp, model, rows)
    d_off = float(np.max(np.abs(served - offline)))
    d_rec = float(np.max(np.abs(served[:len(samples)] - recorded))) if len(samples) else 0.0
    info = model_info(args.url)
    ok = d_off <= args.tol and d_rec <= args.tol and len(served) == len(rows)
    print(f"served vs offline: {len(rows)} rows ({len(samples)} bundle samples + {len(raw)} raw rows of "
          f"{os.path.basename(files[-1]) if files else '-'}), max |served - offline| {d_off:.2e}, "
          f"max |served - recorded at training| {d_rec:.2e}, tolerance {args.tol:g}: {'EQUAL' if ok else 'DIFFERENT'}")
    print(f"served model: {info.get('version')} {info.get('model', '')}".rstrip())
    return 0 if ok else 1


def summary(args: argparse.Namespace) -> int:
    m = json.load(open(os.path.join(args.bundle, "metrics.json")))
    m = m.get("metrics", m)  # the bundle's metrics.json: {"metrics": {...}, "info": {...}}
    hist = m.get("history") or []
    hist = json.loads(hist) if isinstance(hist, str) else hist
    rows = json.load(open(os.path.join(args.run_dir, "data", "profile.json")))["rows_by_split"]["train"]
    epochs = m.get("epochs_run", len(hist))
    e2e = rows * epochs / args.train_wall if args.train_wall else float("nan")
    loop = max((h["samples_per_s"] for h in hist), default=float("nan"))
    train_s = sum(h.get("train_seconds", 0.0) for h in hist)
    eval_s = sum(h.get("eval_seconds", 0.0) for h in hist)
    gpu = f" + {args.device}" if args.device != "CPU" else ""
    print(f"nproc {args.nproc}; Train worker: {args.worker_cpus} CPU{gpu}; Ray Data: the other CPUs "
          f"(train.data_cpus {args.data_cpus})")
    print(f"train rows {rows:,}, epochs run {epochs}, batch {args.batch}; loop time {train_s:.1f} s training + "
          f"{eval_s:.1f} s evaluation; `rankray train` wall {args.train_wall:.1f} s")
    for h in hist:
        print(f"  epoch {h['epoch']}: {h['samples_per_s']:,.0f} samples/s (loop, evaluation excluded), "
              f"valid AUC {h.get('valid_auc', float('nan')):.4f}")
    print(f"{'model-only step (bench_gpu.py, batch on host, pinned)':58} {args.model_only:>14,.0f} samples/s")
    print(f"{'rankray train loop, Ray Data -> worker (best epoch)':58} {loop:>14,.0f} samples/s "
          f"({loop / args.model_only:.2f}x model-only)")
    print(f"{'rankray train end to end (rows x epochs / command wall)':58} {e2e:>14,.0f} samples/s "
          f"({e2e / args.model_only:.2f}x model-only)")
    if args.goal:
        print(f"goal >= {args.goal:,.0f} samples/s end to end: {'MET' if e2e >= args.goal else 'NOT MET'} "
              f"(loop {'meets' if loop >= args.goal else 'does not meet'} it)")
    print(f"test AUC {m.get('test_auc', float('nan')):.4f}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check")
    c.add_argument("--url", required=True)
    c.add_argument("--bundle", required=True)
    c.add_argument("--data", required=True)
    c.add_argument("--rows", type=int, default=512)
    c.add_argument("--tol", type=float, default=1e-5)
    s = sub.add_parser("summary")
    s.add_argument("--bundle", required=True)
    s.add_argument("--run-dir", required=True, help="RUN_DIR of the run: its data/profile.json gives the train rows")
    s.add_argument("--train-wall", type=float, required=True)
    s.add_argument("--model-only", type=float, required=True)
    s.add_argument("--batch", type=int, required=True)
    s.add_argument("--nproc", type=int, default=os.cpu_count())
    s.add_argument("--worker-cpus", default="?")
    s.add_argument("--data-cpus", default="?")
    s.add_argument("--device", default="1 GPU")
    s.add_argument("--goal", type=float, default=0.0)
    args = ap.parse_args()
    return check(args) if args.cmd == "check" else summary(args)


if __name__ == "__main__":
    sys.exit(main())
