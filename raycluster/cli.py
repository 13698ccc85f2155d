"""`rankray` command line: thin wrappers over the stage functions; `main(argv)` is test-callable."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
import time
from collections.abc import Callable

from training.config import Config, ConfigError, dump_config, load_config

log = logging.getLogger("rankray")


def _user_error(exc: BaseException) -> BaseException | None:
    """The ConfigError/DataError behind an exception, also when Ray wrapped it in a task error."""
    from training.features import DataError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConfigError, DataError, FileNotFoundError)):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.set)


def _save_config(cfg: Config, where: str) -> None:
    from training import storage
    from training.data import s3_options

    storage.write_text(storage.join(where, "config.yaml"), dump_config(cfg), s3_options(cfg))


def _announce(dashboard: str) -> None:
    if dashboard:
        print(f"Ray dashboard: {dashboard}", flush=True)


def cmd_generate(args: argparse.Namespace) -> int:
    from raycluster.rayinit import ensure_ray
    from training import synth

    ensure_ray(None)
    info = synth.generate(args.rows, args.out, seed=args.seed, shards=args.shards)
    print(json.dumps({k: v for k, v in info.items() if k != "files"}, indent=2))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from raycluster.rayinit import ensure_ray
    from training.data import split_dataset
    from training.prepare import compute_stats, ensure_data, format_profile, profile

    cfg = _config(args)
    ensure_ray(cfg, job_name=f"{cfg.run.name}-profile")
    ensure_data(cfg)
    ds, _ = split_dataset(cfg)
    print(format_profile(profile(compute_stats(ds, cfg), cfg)))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from raycluster.rayinit import ensure_ray
    from training.prepare import ensure_prepared, format_profile

    cfg = _config(args)
    _announce(ensure_ray(cfg, job_name=f"{cfg.run.name}-prepare"))
    t = time.time()
    res = ensure_prepared(cfg, force=True)
    _save_config(cfg, res["dir"])
    print(format_profile(res["profile"]))
    print(f"\nfit {res['fit_seconds']:.1f} s, encode {res['encode_seconds']:.1f} s "
          f"(total {time.time() - t:.1f} s); encoded shards in {res['encoded']}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from raycluster.rayinit import ensure_ray
    from training.trainer import train

    cfg = _config(args)
    _announce(ensure_ray(cfg, job_name=f"{cfg.run.name}-train"))
    _save_config(cfg, cfg.run_dir)
    res = train(cfg, bundle_path=args.out)
    m = res.metrics
    ran = (f"{m['best_iteration']} trees" if cfg.model.name == "lightgbm"
           else f"{m['epochs_run']} epochs (best at {m['best_epoch']:.2f})")
    print(f"trained {cfg.model.name} in {res.seconds:.0f} s: {ran}, valid AUC {m['best_valid_auc']:.4f}, "
          f"test AUC {m['test_auc']:.4f}, test logloss {m['test_logloss']:.4f}"
          + (f", Bayes ratio {m['test_bayes_ratio']:.3f}" if "test_bayes_ratio" in m else ""))
    print(f"bundle: {res.bundle}\nreport: {res.bundle}/report.html")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from raycluster.rayinit import ensure_ray
    from tune.search import format_table, run_search
    from tune.space import parse_space

    cfg = _config(args)
    parse_space(cfg)  # a bad search space fails before Ray starts
    _announce(ensure_ray(cfg, job_name=f"{cfg.run.name}-tune"))
    res = run_search(cfg, restart=args.restart, export_path=args.out)
    w = res.winner
    print("\n" + format_table(res.table))
    print(f"\nwinner {w['trial_id']} {json.dumps(w['params'])}: valid AUC {w['best_valid_auc']:.4f}, "
          f"test AUC {w['test']['test_auc']:.4f} ({res.seconds:.0f} s)")
    print(f"bundle: {res.bundle}\nresults: {res.results_csv}, {res.results_html}")
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from raycluster.pipeline import GateError, run_pipeline
    from tune.space import parse_space

    cfg = _config(args)
    parse_space(cfg)  # a bad search space fails before any work starts
    _save_config(cfg, cfg.run_dir)
    try:
        run_pipeline(cfg, wait=not args.no_wait, restart_search=args.restart)
    except GateError as e:
        print(f"gate: {e}", file=sys.stderr)
        return 3
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from raycluster.rayinit import ensure_ray
    from training.bundle import load_bundle
    from training.config import config_with
    from training.evaluate import evaluate_encoded, evaluate_raw, write_evaluation
    from training.models import model_label
    from training.prepare import ensure_prepared

    pp, model, meta = load_bundle(args.model)
    cfg = meta["config"]
    if args.data and args.data.endswith((".yaml", ".yml")):
        other = load_config(args.data)
        cfg = config_with(cfg, {"data": other.data.model_dump(mode="json")})
    elif args.data:  # a path: score all of it
        cfg = config_with(cfg, {"data": {**cfg.data.model_dump(mode="json"), "source": args.data,
                                         "split": {"kind": "given"}, "train": args.data, "valid": args.data,
                                         "test": args.data, "generate": None}})
    _announce(ensure_ray(cfg, job_name=f"{cfg.run.name}-evaluate"))
    kw = {"history": meta["metrics"].get("history"),
          "meta": {"bundle": args.model, "version": meta["version"], "model": model_label(meta["arch"])}}
    prep = None if args.data else ensure_prepared(cfg)
    if prep is not None and prep["preprocessor"].to_json() == pp.to_json():
        ev = evaluate_encoded(cfg, pp, model, meta["arch"], prep["encoded"], args.split, **kw)
    else:  # other data, or the run's data now encodes differently: the bundle's own transform, from raw rows
        ev = evaluate_raw(cfg, pp, model, meta["arch"], args.split, **kw)
    out = args.out or f"{cfg.run_dir}/evaluation"
    write_evaluation(out, ev, cfg)
    print(json.dumps(ev["metrics"], indent=2))
    print(f"report: {out}/report.html")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from raycluster.rayinit import ensure_ray
    from training.batchscore import score
    from training.bundle import load_bundle
    from training.data import s3_options

    cfg = load_bundle(args.model)[2]["config"]
    _announce(ensure_ray(cfg, job_name=f"{cfg.run.name}-score"))
    summary = score(args.model, args.data, args.out, keep=args.keep, top_k=args.top_k, group=args.group,
                    batch_size=args.batch_size, s3=s3_options(cfg))
    print(json.dumps(summary, indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from raycluster.serve import run_server

    cfg = _config(args) if args.config else None
    run_server(args.model, cfg.serve if cfg else None, cfg, host=args.host, port=args.port, wait=not args.no_wait)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rankray", description="Train, tune and serve a ranking model on Ray.")
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's own log lines, progress blocks and the workers' output")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name: str, fn: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--config", required=True, help="YAML config file")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.lr=0.003 (repeatable)")
        sp.set_defaults(fn=fn)
        return sp

    g = sub.add_parser("generate", help="write synthetic marketplace interactions as Parquet")
    g.add_argument("--rows", type=int, required=True)
    g.add_argument("--out", required=True, help="output directory (local or s3://)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--shards", type=int, default=8)
    g.set_defaults(fn=cmd_generate)
    with_config("profile", cmd_profile, "print a data profile computed with Ray Data")
    with_config("prepare", cmd_prepare, "validate, split, fit the preprocessor and encode the data")
    tr = with_config("train", cmd_train, "train one model on Ray Train and write its bundle")
    tr.add_argument("--out", default=None, help="bundle path (default: RUN_DIR/model)")
    tu = with_config("tune", cmd_tune, "search hyperparameters (Ray Tune + Optuna + ASHA); export the winner")
    tu.add_argument("--out", default=None, help="winner bundle path (default: tune.export_path, else RUN_DIR/winner)")
    tu.add_argument("--restart", action="store_true", help="discard an interrupted search of this run name")
    pl = with_config("pipeline", cmd_pipeline, "the whole job: prepare, tune, evaluate, gate, deploy, smoke request")
    pl.add_argument("--no-wait", action="store_true", help="exit after the smoke request instead of serving")
    pl.add_argument("--restart", action="store_true", help="discard an interrupted search of this run name")
    ev = sub.add_parser("evaluate", help="score a split with a bundle; write report.html + metrics.json")
    ev.add_argument("--model", required=True, help="bundle directory (local or s3://)")
    ev.add_argument("--data", default=None, help="a config YAML (its data section) or a data path (scored whole)")
    ev.add_argument("--split", default="test", choices=["train", "valid", "test"])
    ev.add_argument("--out", default=None, help="output directory (default: RUN_DIR/evaluation)")
    ev.set_defaults(fn=cmd_evaluate)
    sc = sub.add_parser("score", help="batch-score Parquet rows with a bundle: a score per row, or the top K per group")
    sc.add_argument("--model", required=True, help="bundle directory (local or s3://)")
    sc.add_argument("--data", required=True, help="Parquet file, directory or glob (local or s3://): raw rows")
    sc.add_argument("--out", required=True, help="output directory (local or s3://); rerun to resume")
    sc.add_argument("--keep", nargs="+", default=None, metavar="COL",
                    help="input columns written beside the score (default: all of them)")
    sc.add_argument("--top-k", type=int, default=None, help="write only the best K rows of each --group, ranked")
    sc.add_argument("--group", default=None, help="the column whose groups --top-k ranks within (e.g. the user)")
    sc.add_argument("--batch-size", type=int, default=65536, help="rows a scorer reads and scores at once")
    sc.set_defaults(fn=cmd_score)
    sv = sub.add_parser("serve", help="serve a bundle over HTTP on Ray Serve (/rank, /predict, /model, /docs)")
    sv.add_argument("--model", required=True, help="bundle directory (local or s3://)")
    sv.add_argument("--config", default=None, help="config YAML whose serve section is used (default: the bundle's)")
    sv.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    sv.add_argument("--host", default=None, help="bind address (default: serve.host, 127.0.0.1)")
    sv.add_argument("--port", type=int, default=None, help="HTTP port (default: serve.port, 8000)")
    sv.add_argument("--no-wait", action="store_true",
                    help="return once healthy (the app outlives this command only on a long-running cluster)")
    sv.set_defaults(fn=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    import raycluster

    raycluster.use_token_auth()  # before anything imports ray
    from training.console import VERBOSE_ENV, verbose

    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    logging.basicConfig(level=logging.INFO if verbose() else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except Exception as e:  # noqa: BLE001 - user errors get one clear line, the rest a traceback
        err = _user_error(e)
        if err is None:
            raise
        if verbose():  # the whole story behind the one line
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
