"""`rankray score` throughput and driver memory: rows/s on generated rows (the demo spec) against a bare
loop a user would write by hand (one process: pyarrow reads each file a batch at a time, the same
`score_columns` scores it, pyarrow writes it), and the driver's peak memory from the smallest size to the
largest (flat: the driver gets a row count per file, never the rows).

    python benchmarks/bench_score.py [--rows 1000000,10000000] [--files 16]

Each measurement runs in a fresh process (its own local Ray for `rankray score`, never a cluster already
running on the machine), whose peak memory is its own high-water mark (Linux VmHWM). An untrained bundle of
the demo config is used: the speed does not depend on the weights. Prints a table and `HEADLINE` lines.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import raycluster  # noqa: E402

raycluster.use_token_auth()  # before ray is imported


def _peak_mb() -> float:
    """This process's peak RSS. Not ru_maxrss: Linux carries the parent's peak across fork + exec into the
    child's ru_maxrss, so it read this benchmark's own parent (its peak grows with the rows it generated:
    synth.generate gathers the test split's labels) instead of the scoring driver."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def child(mode: str, bundle: str, data: str, out: str, batch: int) -> None:
    """One measurement in this process; prints a JSON line."""
    t0 = time.time()
    if mode == "rankray":
        import ray

        from training.batchscore import score
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        t0 = time.time()  # Ray's start is not scoring
        res = score(bundle, data, out, keep=["user_id", "job_id"], batch_size=batch)
        rows = res["rows_scored_now"]
    else:  # the bare loop
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq
        import torch

        from training import storage
        from training.bundle import load_bundle
        from training.scoring import score_columns
        torch.set_num_threads(os.cpu_count() or 1)
        pp, model, _ = load_bundle(bundle)
        rows = 0
        os.makedirs(out, exist_ok=True)
        for i, f in enumerate(storage.list_files(data, suffixes=(".parquet",))):
            pf = pq.ParquetFile(f)
            with pq.ParquetWriter(f"{out}/{i}.parquet", pa.schema([("user_id", pa.int64()), ("job_id", pa.int64()),
                                                                   ("score", pa.float32())])) as w:
                for b in pf.iter_batches(batch_size=batch, columns=list(dict.fromkeys(pp.input_columns + ["user_id", "job_id"]))):
                    t = pa.Table.from_batches([b])
                    p, _ = score_columns(pp, model, {c: t.column(c) for c in pp.input_columns})
                    w.write_table(t.select(["user_id", "job_id"]).append_column("score", pa.array(np.asarray(p, np.float32))))
                    rows += t.num_rows
    print(json.dumps({"mode": mode, "rows": rows, "seconds": time.time() - t0, "peak_mb": _peak_mb()}), flush=True)


def measure(mode: str, bundle: str, data: str, where: str, batch: int) -> dict:
    out = tempfile.mkdtemp(dir=where, prefix=f"out-{mode}-")
    p = subprocess.run([sys.executable, __file__, "--child", mode, bundle, data, out, str(batch)], cwd=ROOT,
                       capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1000000,10000000", help="sizes, comma-separated")
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--batch", type=int, default=65536)
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, bundle, data, out, batch = args.child
        return child(mode, bundle, data, out, int(batch))

    import ray

    from tests.helpers import untrained_bundle
    from training import synth
    sizes = [int(x) for x in args.rows.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="rankray-bench-score-") as where:
        bundle = untrained_bundle(f"{where}/bundle")
        for n in sizes:
            data = f"{where}/data-{n}"
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
            synth.generate(n, data, shards=args.files)
            ray.shutdown()
            # alternately, so both see the same machine state
            for mode in ("bare", "rankray"):
                r = measure(mode, bundle, data, where, args.batch)
                results.append({**r, "size": n})
                print(f"  {mode:8s} {n:>11,} rows: {r['rows'] / r['seconds']:>10,.0f} rows/s, "
                      f"{r['seconds']:.1f} s, peak memory {r['peak_mb']:,.0f} MB", flush=True)
            subprocess.run(["rm", "-rf", data])
    print("\n| rows | bare loop rows/s | rankray score rows/s | ratio | bare peak MB | rankray driver peak MB |")
    print("|---|---|---|---|---|---|")
    by = {(r["mode"], r["size"]): r for r in results}
    for n in sizes:
        b, s = by["bare", n], by["rankray", n]
        print(f"| {n:,} | {b['rows'] / b['seconds']:,.0f} | {s['rows'] / s['seconds']:,.0f} | "
              f"{(s['rows'] / s['seconds']) / (b['rows'] / b['seconds']):.2f}x | {b['peak_mb']:,.0f} | {s['peak_mb']:,.0f} |")
    small, big = by["rankray", sizes[0]], by["rankray", sizes[-1]]
    cpus = os.cpu_count()
    print(f"HEADLINE | `rankray score`, {big['size']:,} rows, {cpus} CPUs: rows/s vs a bare one-process loop | "
          f"{big['rows'] / big['seconds']:,.0f} vs {by['bare', sizes[-1]]['rows'] / by['bare', sizes[-1]]['seconds']:,.0f}"
          f" ({(big['rows'] / big['seconds']) / (by['bare', sizes[-1]]['rows'] / by['bare', sizes[-1]]['seconds']):.2f}x)")
    print(f"HEADLINE | `rankray score` driver peak memory, {small['size']:,} -> {big['size']:,} rows | "
          f"{small['peak_mb']:,.0f} -> {big['peak_mb']:,.0f} MB ({big['peak_mb'] / small['peak_mb']:.2f}x)")


if __name__ == "__main__":
    main()
