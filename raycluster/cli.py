"""`rankray` command line: thin wrappers over the stage functions; `main(argv)` is test-callable."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable

from raycluster.config import Config, ConfigError, dump_config, load_config

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


def ensure_data(cfg: Config) -> None:
    """Generate the configured synthetic dataset when `data.generate` is set and the source is missing."""
    from training import storage, synth
    from training.data import s3_options

    g = cfg.data.generate
    if g is None or storage.exists(cfg.data.source, s3_options(cfg)):
        return
    print(f"== generating {g.rows:,} synthetic rows into {cfg.data.source}", flush=True)
    info = synth.generate(g.rows, cfg.data.source, seed=g.seed, shards=g.shards, s3=s3_options(cfg))
    print(f"   {info['rows']:,} rows in {info['seconds']:.1f} s, base rate {info['base_rate']:.4f}, "
          f"Bayes AUC (test) {info['bayes_auc_test']:.4f}", flush=True)


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
    from training.prepare import compute_stats, format_profile, profile

    cfg = _config(args)
    ensure_ray(cfg, job_name=f"{cfg.run.name}-profile")
    ensure_data(cfg)
    ds, _ = split_dataset(cfg)
    print(format_profile(profile(compute_stats(ds, cfg), cfg)))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from raycluster.rayinit import ensure_ray
    from training.prepare import format_profile, prepare

    cfg = _config(args)
    ensure_ray(cfg, job_name=f"{cfg.run.name}-prepare")
    ensure_data(cfg)
    t = time.time()
    res = prepare(cfg)
    _save_config(cfg, res["dir"])
    print(format_profile(res["profile"]))
    print(f"\nfit {res['fit_seconds']:.1f} s, encode {res['encode_seconds']:.1f} s "
          f"(total {time.time() - t:.1f} s); encoded shards in {res['encoded']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rankray", description="Train, tune and serve a ranking model on Ray.")
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
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except Exception as e:  # noqa: BLE001 - user errors get one clear line, the rest a traceback
        err = _user_error(e)
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
