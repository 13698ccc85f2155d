"""`make demo`'s pipeline, timed: generate (when missing) -> prepare -> search -> baseline -> gate -> deploy ->
smoke request, on the embedded default config, as a new user runs it (a fresh run name, so nothing is reused
but the generated data).

    .venv/bin/python benchmarks/bench_demo.py [--run-name bench-demo-pipeline]
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-name", default="bench-demo-pipeline")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    shutil.rmtree(ROOT / "runs" / args.run_name, ignore_errors=True)  # a fresh run: no stage is skipped
    cmd = [sys.executable, "-m", "raycluster", "pipeline", "--config", "configs/demo.yaml", "--no-wait",
           "--set", f"run.name={args.run_name}", "--set", f"serve.port={port}"]
    t0 = time.time()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.time() - t0
    print(out.stdout[-4000:] + out.stderr[-2000:])
    if out.returncode != 0:
        return out.returncode
    stages = json.loads((ROOT / "runs" / args.run_name / "pipeline" / "stages.json").read_text())
    test_auc = stages["tune (Ray Tune + Optuna + ASHA)"]["outputs"]["test"]["test_auc"]
    lines = sum(1 for _ in out.stdout.splitlines())
    print(f"HEADLINE | `make demo` (1M generated rows: prepare, 4-trial search, logreg baseline, gate, deploy, smoke "
          f"request), generated data reused | {seconds / 60:.1f} min, winner test AUC {test_auc:.4f}, "
          f"{lines} lines of output")
    return 0


if __name__ == "__main__":
    sys.exit(main())
