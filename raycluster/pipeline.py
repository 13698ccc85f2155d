"""`rankray pipeline`: profile -> split -> fit/encode -> tune -> evaluate the winner on test -> gate ->
deploy on Serve -> smoke request -> where everything is.

Every stage writes into the run directory (local or s3://) and records itself in
`RUN_DIR/pipeline/stages.json` with a fingerprint of what it depends on; running the same command
again skips the stages whose record still matches (an interrupted search resumes where it stopped).
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

from training import storage
from training.config import Config, config_with, fingerprint
from training.data import s3_options
from training.features import Preprocessor
from tune.space import model_names


class GateError(RuntimeError):
    """The winner is not good enough to deploy; the message says why."""


class Stages:
    """Stage records in RUN_DIR/pipeline/stages.json; a stage re-runs when its fingerprint changes."""

    def __init__(self, cfg: Config) -> None:
        self.s3 = s3_options(cfg)
        self.path = storage.join(cfg.run_dir, "pipeline", "stages.json")
        self.records: dict[str, dict] = json.loads(storage.read_text(self.path, self.s3)) \
            if storage.exists(self.path, self.s3) else {}
        self.t0 = time.time()
        self.n = 0

    def banner(self, name: str, total: int) -> None:
        self.n += 1
        print(f"\n=== [{self.n}/{total}] {name} ===", flush=True)

    def run(self, name: str, fingerprint: str, fn: Callable[[], dict], total: int,
            still_there: Callable[[dict], bool] = lambda _: True) -> dict:
        self.banner(name, total)
        rec = self.records.get(name)
        if rec and rec.get("fingerprint") == fingerprint and still_there(rec["outputs"]):
            print(f"    done before ({rec['seconds']:.0f} s then): skipped", flush=True)
            return rec["outputs"]
        t = time.time()
        outputs = fn()
        self.records[name] = {"fingerprint": fingerprint, "seconds": time.time() - t, "outputs": outputs}
        storage.write_text(self.path, json.dumps(self.records, indent=2, default=str), self.s3)
        print(f"    {name} done in {time.time() - t:.1f} s (pipeline at {time.time() - self.t0:.0f} s)", flush=True)
        return outputs


def gate(cfg: Config, test_auc: float, baseline_auc: float | None, gbdt_auc: float | None = None) -> str:
    """Why the winner may be deployed; raises GateError saying why not. LightGBM at its defaults on the same
    split is shown beside it: it informs and does not block (a search of both families usually holds it)."""
    p = cfg.pipeline
    if not test_auc >= p.min_test_auc:
        raise GateError(f"winner test AUC {test_auc:.4f} is below pipeline.min_test_auc {p.min_test_auc:.4f}: "
                        "not deployed")
    if baseline_auc is not None and not test_auc > baseline_auc:
        raise GateError(f"winner test AUC {test_auc:.4f} does not beat the logreg baseline ({baseline_auc:.4f}) "
                        "on the same split: not deployed")
    vs = f" > logreg {baseline_auc:.4f}" if baseline_auc is not None else ""
    if gbdt_auc is not None:
        vs += (f", {'>' if test_auc > gbdt_auc else '<='} lightgbm {gbdt_auc:.4f}"
               + ("" if test_auc > gbdt_auc else " (lightgbm is better here: " + (
                   "more trials, tune.num_samples, may find it)" if "lightgbm" in model_names(cfg)
                   else "add it to the search, tune.search_space model.name: {choice: [..., lightgbm]})")))
    return f"winner test AUC {test_auc:.4f} >= min {cfg.pipeline.min_test_auc:.4f}{vs}: deploy"


def smoke_request(url: str, pp: Preprocessor, meta: dict[str, Any], api_key: str | None = None,
                  k: int = 10) -> dict[str, Any]:
    """Rank the bundle's sample rows as candidates through the live endpoint."""
    from serving.client import rank

    rows = meta["samples"]["rows"][:k]
    cands = [{"id": f"sample-{i}", **{c: r.get(c) for c in pp.input_columns}} for i, r in enumerate(rows)]
    return rank(url, {}, cands, top_k=min(5, len(cands)), api_key=api_key)


def run_pipeline(cfg: Config, *, wait: bool = True, restart_search: bool = False) -> dict[str, Any]:
    from raycluster.rayinit import ensure_ray
    from training.prepare import data_fingerprint, ensure_prepared, format_profile
    from training.resources import held
    from training.trainer import train
    from tune.search import run_search, search_fingerprint, winner_path

    dashboard = ensure_ray(cfg, job_name=f"{cfg.run.name}-pipeline")
    if dashboard:
        print(f"Ray dashboard: {dashboard}", flush=True)
    st = Stages(cfg)
    total = 4 + (1 if cfg.pipeline.baseline else 0) + (2 if cfg.pipeline.deploy else 0)
    s3 = s3_options(cfg)

    # what the run holds at once, checked before any data work against what the cluster has or its autoscaler
    # can start, and asked of the autoscaler until the search and the baselines are done
    with held(cfg, cfg.tune.max_concurrent_trials):
        def data() -> dict:
            prep = ensure_prepared(cfg)
            print(format_profile(prep["profile"]), flush=True)
            return {"encoded": prep["encoded"], "rows": prep["profile"]["rows_by_split"]}

        st.run("profile, split, fit and encode", data_fingerprint(cfg), data, total,
               lambda o: storage.exists(o["encoded"], s3))

        bundle = winner_path(cfg)

        def search() -> dict:
            res = run_search(cfg, restart=restart_search, export_path=bundle)
            from tune.search import format_table
            print("\n" + format_table(res.table), flush=True)
            return {"bundle": res.bundle, "trial": res.winner["trial_id"], "params": res.winner["params"],
                    "best_valid_auc": res.winner["best_valid_auc"], "test": res.winner["test"],
                    "results_html": res.results_html, "results_csv": res.results_csv}

        won = st.run("tune (Ray Tune + Optuna + ASHA)", search_fingerprint(cfg) + bundle, search, total,
                     lambda o: storage.exists(storage.join(o["bundle"], "manifest.json"), s3))
        print(f"    winner {won['trial']} {json.dumps(won['params'])}: valid AUC {won['best_valid_auc']:.4f}", flush=True)

        st.run("evaluate the winner on test", won["bundle"] + json.dumps(won["test"]),
               lambda: _show_test(won), total)

        baseline_auc = gbdt_auc = None
        if cfg.pipeline.baseline:
            def baseline() -> dict:
                out = {}
                for name in ("logreg", "lightgbm"):
                    res = train(config_with(cfg, {"model.name": name}), run_name=f"{cfg.run.name}-{name}",
                                write_bundle=False)
                    out[name] = {"test_auc": res.metrics["test_auc"], "best_valid_auc": res.metrics["best_valid_auc"]}
                return out

            # the baselines depend on the data and the training settings, not on the search
            base = st.run("baselines: logreg and lightgbm on the same split",
                          fingerprint(cfg, {"data": (), "features": (), "train": (), "model": ()}, extra={"baselines": 2}),
                          baseline, total)
            baseline_auc, gbdt_auc = base["logreg"]["test_auc"], base["lightgbm"]["test_auc"]
            print(f"    logreg test AUC {baseline_auc:.4f}, lightgbm test AUC {gbdt_auc:.4f}", flush=True)

    st.banner("gate", total)
    print("    " + gate(cfg, won["test"]["test_auc"], baseline_auc, gbdt_auc), flush=True)

    out = {"bundle": won["bundle"], "report": storage.join(won["bundle"], "report.html"),
           "search_results": won["results_html"], "dashboard": dashboard, "test_auc": won["test"]["test_auc"],
           "baseline_test_auc": baseline_auc, "lightgbm_test_auc": gbdt_auc, "url": None}
    if cfg.pipeline.deploy:
        from raycluster.serve import curl_line, example_body, run_server
        from training.bundle import load_bundle

        st.banner("deploy on Ray Serve", total)
        pp, _, meta = load_bundle(won["bundle"])  # once: checked here, then handed to the deploy and the smoke test
        url = run_server(won["bundle"], cfg.serve, cfg, wait=False, loaded=(pp, meta))
        out["url"] = url
        st.banner("smoke request", total)
        key = os.environ.get(cfg.serve.api_key_env) if cfg.serve.api_key_env else None
        ranked = smoke_request(url, pp, meta, key)
        print(f"    POST {url}/rank with 10 candidates -> top {len(ranked['results'])} "
              f"(model {ranked['model_version']}):", flush=True)
        for r in ranked["results"]:
            print(f"      #{r['index']:<3} {r.get('id', '')}  score {r['score']:.4f}", flush=True)
        out["curl"] = curl_line(url, example_body(pp, meta), cfg.serve.api_key_env)
    _summary(out)
    if cfg.pipeline.deploy and wait:
        from raycluster.serve import serve_until_interrupted
        serve_until_interrupted()
    return out


def _show_test(won: dict) -> dict:
    t = won["test"]
    keys = [k for k in ("test_auc", "test_logloss", "test_gauc", "test_ndcg@10", "test_ece", "test_bayes_ratio")
            if k in t]
    print("    " + ", ".join(f"{k} {t[k]:.4f}" for k in keys), flush=True)
    print(f"    report: {storage.join(won['bundle'], 'report.html')}", flush=True)
    return {"test": t}


def _summary(out: dict) -> None:
    print("\n=== where everything is ===", flush=True)
    for label, key in (("model bundle", "bundle"), ("evaluation report", "report"),
                       ("search results", "search_results"), ("endpoint", "url"), ("API docs", "url"),
                       ("Ray dashboard", "dashboard")):
        if out.get(key):
            print(f"  {label:18} {out[key]}{'/docs' if label == 'API docs' else ''}", flush=True)
    if out.get("curl"):
        print(f"  try it:\n    {out['curl']}", flush=True)
