"""/rank with 100 candidates, closed loop, at several client counts: (a) the scorer in-process (no HTTP),
(b) the same Service on bare FastAPI + uvicorn (one process, no batching), (c) rankray on Ray Serve.

    .venv/bin/python benchmarks/bench_serve.py [--model BUNDLE] [--duration 10] [--concurrency 1,8,16,32]

Without --model an untrained bundle of the demo config is built (speed does not depend on the weights).
The load generator is a minimal asyncio HTTP/1.1 keep-alive client: httpx costs ~10x more CPU per
request, which on a small machine would be taken from the servers being measured.
"""
import argparse
import asyncio
import collections
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import raycluster  # noqa: E402,F401 - sets RAY_AUTH_MODE before ray is imported
from raycluster.config import ServeConfig, load_config  # noqa: E402

CONTEXT_FIELDS = ("user_id", "user_country", "user_skills", "hourly_rate", "tier", "hour", "device")


def untrained_bundle(path: str) -> str:
    """A demo-config bundle with a preprocessor fitted on 20k synthetic rows (no Ray needed)."""
    import pyarrow as pa
    import torch

    from training import synth
    from training.bundle import save_bundle
    from training.data import SPLIT
    from training.evaluate import fields_of
    from training.models import build_model, model_arch
    from training.prepare import PartialStats, Stats, fit_preprocessor

    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"), ["data.generate=null"])
    table = synth.generate_shard(20_000, 0, 0, 1)
    table = table.append_column(SPLIT, pa.array(np.zeros(len(table), np.int8)))
    pp = fit_preprocessor(Stats(PartialStats(cfg)(table).to_pandas()), cfg, table.schema)
    torch.manual_seed(0)
    fields = fields_of(pp)
    model = build_model(cfg.model, fields, len(pp.num_columns))
    samples = table.select(pp.input_columns).slice(0, 8).to_pylist()
    save_bundle(path, cfg, pp, model, model_arch(cfg.model, fields, len(pp.num_columns)),
                metrics={"test_auc": 0.5}, samples=samples)
    return path


def rank_bodies(n_candidates: int, count: int = 8) -> list[dict[str, Any]]:
    from training import synth

    rows = synth.generate_shard(n_candidates * count, 7, 0, 1).to_pylist()
    out = []
    for k in range(count):
        chunk = rows[k * n_candidates:(k + 1) * n_candidates]
        ctx = {f: chunk[0][f] for f in CONTEXT_FIELDS}
        cands = [{"id": f"job-{r['job_id']}", **{f: v for f, v in r.items() if f not in CONTEXT_FIELDS}} for r in chunk]
        out.append({"context": ctx, "candidates": cands, "top_k": 10})
    return out


# ---------------------------------------------------------------- load generation
async def _response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    status = int((await reader.readline()).split(b" ", 2)[1])
    length, chunked, close = 0, False, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        k, _, v = line.partition(b":")
        k, v = k.strip().lower(), v.strip().lower()
        if k == b"content-length":
            length = int(v)
        elif k == b"transfer-encoding":
            chunked = v == b"chunked"
        elif k == b"connection":
            close = v == b"close"
    if chunked:
        while (size := int((await reader.readline()).strip(), 16)) > 0:
            await reader.readexactly(size + 2)
        await reader.readline()
    else:
        await reader.readexactly(length)
    return status, close


async def _client(port: int, reqs: list[bytes], start: float, stop: float, lat: list[float],
                  codes: collections.Counter, k: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = k
    while (t0 := time.perf_counter()) < stop:
        writer.write(reqs[i % len(reqs)])
        i += 1
        status, close = await _response(reader)
        if t0 >= start:  # requests begun in the warm-up are not counted
            lat.append(time.perf_counter() - t0)
            codes[status] += 1
        if close:
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.close()


def http_load(port: int, bodies: list[bytes], clients: int, duration: float, warmup: float) -> dict[str, Any]:
    reqs = [(f"POST /rank HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
             f"Content-Length: {len(b)}\r\n\r\n").encode() + b for b in bodies]
    lat: list[float] = []
    codes: collections.Counter = collections.Counter()

    async def run() -> None:
        start = time.perf_counter() + warmup
        await asyncio.gather(*[_client(port, reqs, start, start + duration, lat, codes, k) for k in range(clients)])

    asyncio.run(run())
    return _summary(lat, duration, codes)


def inprocess_load(fn: Any, args: list[Any], clients: int, duration: float, warmup: float) -> dict[str, Any]:
    lat: list[float] = []
    start = time.perf_counter() + warmup
    stop = start + duration

    def loop(k: int) -> None:
        i = k
        while (t0 := time.perf_counter()) < stop:
            fn(args[i % len(args)])
            i += 1
            if t0 >= start:
                lat.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return _summary(lat, duration, collections.Counter({200: len(lat)}))


def _summary(lat: list[float], duration: float, codes: collections.Counter) -> dict[str, Any]:
    ms = np.array(lat) * 1000
    return {"qps": len(lat) / duration, "p50": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
            "p99": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
            "errors": sum(n for c, n in codes.items() if c != 200)}


# ---------------------------------------------------------------- servers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(port: int, timeout: float = 120.0) -> None:
    from serving.client import healthy

    deadline = time.time() + timeout
    while not healthy(f"http://127.0.0.1:{port}"):
        if time.time() > deadline:
            raise RuntimeError(f"server on port {port} did not become healthy")
        time.sleep(0.3)


def serve_bare(bundle: str, port: int) -> None:
    """The baseline server: the same Service as the Serve replica, on one uvicorn worker, no batching."""
    import uvicorn
    from fastapi import FastAPI
    from starlette.requests import Request
    from starlette.responses import Response

    from serving.core import Scorer, Service

    scorer = Scorer(bundle)

    async def score(columns: dict[str, list[Any]]) -> Any:
        return scorer.score_parts([columns])[0]

    service = Service(scorer, ServeConfig(), score)
    app = FastAPI()

    @app.post("/rank")
    async def rank(request: Request) -> Response:
        return await service.rank(request)

    @app.get("/healthz")
    async def healthz() -> Response:
        return service.healthz()

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def run_all(args: argparse.Namespace, bundle: str) -> dict[tuple[str, int], dict[str, Any]]:
    bodies = rank_bodies(args.candidates)
    raw = [json.dumps(b).encode() for b in bodies]
    res: dict[tuple[str, int], dict[str, Any]] = {}

    from serving.core import Scorer
    from serving.schema import Schema

    scorer = Scorer(bundle)
    schema = Schema(scorer.pp, 1000)
    cols = [schema.rank_request(b)[0] for b in bodies]
    for c in args.concurrency:
        res["in-process", c] = inprocess_load(scorer.score, cols, c, args.duration, args.warmup)
        _report_point("in-process", c, res["in-process", c])

    port = _free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--bare-server", str(port), "--model", bundle])
    try:
        _wait_healthy(port)
        for c in args.concurrency:
            res["bare", c] = http_load(port, raw, c, args.duration, args.warmup)
            _report_point("bare", c, res["bare", c])
    finally:
        proc.terminate()
        proc.wait()

    import ray
    from ray import serve

    from serving.app import build_app

    ray.init(include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(bundle, ServeConfig()), name="rankray", route_prefix="/")
    try:
        _wait_healthy(port)
        for c in args.concurrency:
            res["serve", c] = http_load(port, raw, c, args.duration, args.warmup)
            _report_point("serve", c, res["serve", c])
    finally:
        serve.shutdown()
        ray.shutdown()
    return res


def _report_point(name: str, c: int, r: dict[str, Any]) -> None:
    print(f"  {name:<10} c={c:<3} {r['qps']:8.1f} QPS  p50 {r['p50']:7.2f} ms  p99 {r['p99']:7.2f} ms"
          f"  non-200 {r['errors']}", flush=True)


def print_table(res: dict[tuple[str, int], dict[str, Any]], conc: list[int]) -> None:
    print(f"\n{'clients':>7} | {'in-process QPS':>14} | {'bare QPS':>8} {'p50':>7} {'p99':>7} | "
          f"{'serve QPS':>9} {'p50':>7} {'p99':>7} | {'serve/bare QPS':>14} {'p99':>6}")
    for c in conc:
        a, b, s = res["in-process", c], res["bare", c], res["serve", c]
        print(f"{c:>7} | {a['qps']:>14.1f} | {b['qps']:>8.1f} {b['p50']:>7.1f} {b['p99']:>7.1f} | "
              f"{s['qps']:>9.1f} {s['p50']:>7.1f} {s['p99']:>7.1f} | {s['qps'] / b['qps']:>14.2f} "
              f"{s['p99'] / b['p99']:>6.2f}")
    print("(latencies in ms; in-process = validation + transform + forward on threads, no HTTP/JSON)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="bundle directory (default: build an untrained demo bundle)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=1.5, help="unmeasured seconds before each point")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 16, 32])
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--bare-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.bare_server:
        serve_bare(args.model, args.bare_server)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.model or untrained_bundle(os.path.join(tmp, "bundle"))
        print(f"bundle {bundle}; {args.candidates} candidates per /rank; {args.duration:g} s per point; "
              f"{os.cpu_count()} CPUs", flush=True)
        res = run_all(args, bundle)
    print_table(res, args.concurrency)
    return 0


if __name__ == "__main__":
    sys.exit(main())
