"""Search efficiency and per-trial fixed cost: TPE + ASHA against random search without early
stopping, on the same prepared data, search space and trial budget, in one run.

    .venv/bin/python benchmarks/bench_tune.py [--rows 100000] [--trials 16] [--epochs 4]

Prints the best validation AUC each reached, the trial-epochs each spent, and the fixed cost of a
trial (Tune's trial start -> first training step), first trial and the ones after it.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import raycluster

raycluster.use_token_auth()  # before ray is imported

import ray

from raycluster.rayinit import ensure_ray
from training.config import load_config
from training.prepare import ensure_prepared
from training.sizing import sized
from tune.search import TrialClock, make_tuner, results_table

SPACE = {"train.lr": {"loguniform": [0.0001, 0.03]}, "model.embedding_dim": {"int": [4, 24]},
         "model.mlp": {"choice": [[256, 128], [64, 32], [16]]}, "model.cross_layers": {"int": [0, 3]}}


def run(cfg, prep, name: str, **kw) -> dict:
    clock = TrialClock()
    t0 = time.time()
    cfg = sized(cfg, prep["profile"]["rows_by_split"]["train"])  # as run_search does
    grid = make_tuner(cfg, prep, restart=True, callbacks=[clock], name=name, **kw).fit()
    wall = time.time() - t0
    table = results_table(grid, cfg, clock)
    startups = [clock.startup(t) for t in sorted(clock.started, key=clock.started.get)]
    startups = [s for s in startups if s is not None]
    return {"best": max(r["best_valid_auc"] for r in table), "trial_epochs": sum(r["epochs_run"] or 0 for r in table),
            "stopped": sum(r["stopped_by"] == "asha" for r in table), "wall": wall, "startups": startups,
            "table": table}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--grace-period", type=float, default=None, help="ASHA's, in epochs (default: the config's)")
    ap.add_argument("--reduction-factor", type=int, default=None, help="ASHA's (default: the config's)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        raw = load_config("configs/demo.yaml").model_dump(mode="json")
        raw["run"] = {"name": "bench-tune", "dir": f"{d}/runs"}
        raw["data"].update(source=f"{d}/data", generate={"rows": args.rows, "seed": 3, "shards": 4})
        raw["ray"].update(num_cpus=2, include_dashboard=True)
        raw["train"].update(epochs=args.epochs, cpus_per_worker=1, data_cpus=0.5,
                            patience=1_000, log_every=10_000)  # no patience stop: ASHA (or nothing) stops
        raw["tune"] = {"num_samples": args.trials, "max_concurrent_trials": 1, "seed": 0, "search_space": SPACE}
        for key in ("grace_period", "reduction_factor"):
            if getattr(args, key):
                raw["tune"][key] = getattr(args, key)
        cfg = load_config(raw=raw)
        ensure_ray(cfg)
        prep = ensure_prepared(cfg)
        tpe = run(cfg, prep, "tpe-asha")
        rnd = run(cfg, prep, "random", random_search=True, asha=False)
        ray.shutdown()
    print(f"\n# search: {args.trials} trials x up to {args.epochs} epochs, {args.rows:,} generated rows, "
          "1 trial at a time, 1 worker per trial (2-core machine)")
    print("| search | best valid AUC | trial-epochs | trials stopped early | wall s |")
    print("|---|---|---|---|---|")
    for name, r in (("TPE + ASHA", tpe), ("random, no early stop", rnd)):
        print(f"| {name} | {r['best']:.4f} | {r['trial_epochs']:g} | {r['stopped']} | {r['wall']:.0f} |")
    print(f"AUC difference (TPE+ASHA - random): {tpe['best'] - rnd['best']:+.4f}; "
          f"trial-epochs ratio: {tpe['trial_epochs'] / max(rnd['trial_epochs'], 1):.2f}x")
    s = tpe["startups"] + rnd["startups"]
    later = tpe["startups"][1:] + rnd["startups"][1:]
    print(f"trial fixed cost (trial start -> first step): first {tpe['startups'][0]:.1f} s; after the first: "
          f"median {statistics.median(later):.1f} s, max {max(later):.1f} s ({len(s)} trials)")
    print(f"HEADLINE | search: TPE + ASHA vs seeded random search, same budget ({args.trials} trials x {args.epochs} "
          f"epochs) | {tpe['trial_epochs'] / max(rnd['trial_epochs'], 1):.2f}x the trial-epochs "
          f"({tpe['trial_epochs']:.1f} vs {rnd['trial_epochs']:g}); best valid AUC {tpe['best'] - rnd['best']:+.4f} "
          f"({tpe['best']:.4f} vs {rnd['best']:.4f}); wall {tpe['wall']:.0f} vs {rnd['wall']:.0f} s")
    print(f"HEADLINE | trial fixed cost (Tune trial start -> first training step), first trial / the ones after it | "
          f"{tpe['startups'][0]:.1f} s / median {statistics.median(later):.1f} s")


if __name__ == "__main__":
    main()
