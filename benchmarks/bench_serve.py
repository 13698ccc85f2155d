"""/rank with 100 candidates, closed loop, at several client counts: (a) the scorer in-process, no HTTP,
the c requests scored as one ideal batch (transform + forward); (b) the fair peer: the same Service on
FastAPI + uvicorn (one process) behind a hand-written asyncio micro-batcher (up to serve.max_batch_size
waiting requests or serve.batch_wait_timeout_s, then one `score_parts` call), what a user would write in
front of the scorer; (c) the same without batching (one request per call); (d) rankray on Ray Serve (one
replica, dynamic batching), started as `rankray serve` starts it, with each serve.ingress: `proxy`
(Serve's HTTP proxy in front, the default) and `direct` (the replica answers on the port itself). The
peers and Serve are measured alternately, point by point, in the same run.

    .venv/bin/python benchmarks/bench_serve.py [--model BUNDLE] [--duration 10] [--concurrency 1,8,16,32]

Without --model an untrained bundle of the demo config is built (speed does not depend on the weights).
The load generator is a minimal asyncio HTTP/1.1 keep-alive client: httpx spent ~1 ms of CPU per request
here against ~0.2 ms for it, CPU that a small machine would take from the servers being measured.
"""
import argparse
import asyncio
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import raycluster  # noqa: E402

raycluster.use_token_auth()  # before ray is imported
from training.config import ServeConfig  # noqa: E402
from raycluster.rayinit import free_port  # noqa: E402
from tests.helpers import untrained_bundle  # noqa: E402

CONTEXT_FIELDS = ("user_id", "user_country", "user_skills", "hourly_rate", "tier", "hour", "device")
ITEM_FIELDS = ("job_id", "job_category", "job_skills", "budget", "client_country", "position")


def rank_bodies(n_candidates: int, count: int = 8) -> list[dict[str, Any]]:
    """`count` /rank bodies: one user's context and `n_candidates` jobs each."""
    from training import synth

    rows = synth.generate_shard(n_candidates * count, 7, 0, 1).to_pylist()
    chunks = [rows[k * n_candidates:(k + 1) * n_candidates] for k in range(count)]
    return [{"context": {f: c[0][f] for f in CONTEXT_FIELDS},
             "candidates": [{"id": f"job-{r['job_id']}", **{f: r[f] for f in ITEM_FIELDS}} for r in c], "top_k": 10}
            for c in chunks]


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
                  codes: collections.Counter, done: list[int], k: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = k
    while (t0 := time.perf_counter()) < stop:
        writer.write(reqs[i % len(reqs)])
        i += 1
        status, close = await _response(reader)
        done[0] += 1
        if t0 >= start:  # requests begun in the warm-up are not counted
            lat.append(time.perf_counter() - t0)
            codes[status] += 1
        if close:
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.close()


def http_load(port: int, bodies: list[bytes], clients: int, duration: float, warmup: float,
              pids: list[int]) -> dict[str, Any]:
    reqs = [(f"POST /rank HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
             f"Content-Length: {len(b)}\r\n\r\n").encode() + b for b in bodies]
    lat: list[float] = []
    codes: collections.Counter = collections.Counter()
    done = [0]  # all completed requests, warm-up included: the CPU figure covers them too

    async def run() -> None:
        start = time.perf_counter() + warmup
        await asyncio.gather(*[_client(port, reqs, start, start + duration, lat, codes, done, k) for k in range(clients)])

    cpu0 = _cpu_seconds(pids)
    asyncio.run(run())
    return {**_summary(lat, duration, codes), "cpu_ms": (_cpu_seconds(pids) - cpu0) / max(done[0], 1) * 1000}


def inprocess_load(scorer: Any, cols: list[dict[str, list[Any]]], clients: int, duration: float,
                   warmup: float) -> dict[str, Any]:
    """`clients` requests scored per call, as one ideal batch: the floor under any server's cost."""
    lat: list[float] = []
    parts = [cols[k % len(cols)] for k in range(clients)]
    start = time.perf_counter() + warmup
    cpu0, calls = time.process_time(), 0
    while (t0 := time.perf_counter()) < start + duration:
        scorer.score_parts(parts)
        calls += 1
        if t0 >= start:
            lat += [time.perf_counter() - t0] * clients
    return {**_summary(lat, duration, collections.Counter({200: len(lat)})),
            "cpu_ms": (time.process_time() - cpu0) / (calls * clients) * 1000}


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of processes (Linux /proc), so cost per request can be compared on a busy machine."""
    total = 0.0
    for pid in pids:
        try:
            f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return float("nan")
    return total


def _serve_pids() -> list[int]:
    """The Serve proxy and replica processes: children of this Ray's raylet (private API; [] if it moved)."""
    import ray

    try:
        raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
        out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    except (AttributeError, KeyError, IndexError, OSError):
        return []
    rows = [line.split(None, 2) for line in out.splitlines() if len(line.split(None, 2)) == 3]
    return [int(p) for p, pp, a in rows if int(pp) == raylet and a.startswith(("ray::ProxyActor", "ray::ServeReplica"))]


def _summary(lat: list[float], duration: float, codes: collections.Counter) -> dict[str, Any]:
    p50, p99 = np.percentile(np.array(lat) * 1000, [50, 99]) if lat else (float("nan"),) * 2
    return {"qps": len(lat) / duration, "p50": float(p50), "p99": float(p99),
            "errors": sum(n for c, n in codes.items() if c != 200)}


# ---------------------------------------------------------------- servers
class MicroBatcher:
    """Requests that wait together are scored together: up to `size` of them, or what came within `wait_s`
    of the first, in one call of `fn` on the event loop (as Serve's replica scores its batches)."""

    def __init__(self, fn: Any, size: int, wait_s: float) -> None:
        self.fn, self.size, self.wait_s = fn, size, wait_s
        self.queue: asyncio.Queue | None = None

    async def __call__(self, columns: dict[str, list[Any]]) -> Any:
        if self.queue is None:
            self.queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._loop())
        done = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((columns, done))
        return await done

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            end = loop.time() + self.wait_s
            while len(batch) < self.size and (left := end - loop.time()) > 0:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            for (_, done), out in zip(batch, self.fn([c for c, _ in batch])):
                done.set_result(out)


def serve_bare(bundle: str, port: int, batched: bool) -> None:
    """A peer server: the same Service as the Serve replica on one uvicorn worker, with the micro-batcher
    (the fair peer) or one request per call."""
    import uvicorn
    from fastapi import FastAPI
    from starlette.requests import Request
    from starlette.responses import Response

    from serving.core import ServedModel, Service

    scorer = ServedModel(bundle)
    cfg = ServeConfig()

    async def one(part: tuple[int, dict[str, list[Any]]]) -> Any:
        return scorer.score_parts([part[1]])[0]

    batch = MicroBatcher(lambda parts: scorer.score_parts([c for _, c in parts]), cfg.max_batch_size,
                         cfg.batch_wait_timeout_s)
    score = batch if batched else one
    service = Service(scorer, cfg, score)
    app = FastAPI()

    @app.post("/rank")
    async def rank(request: Request) -> Response:
        return await service.rank(request)

    @app.get("/healthz")
    async def healthz() -> Response:
        return service.healthz()

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def run_all(args: argparse.Namespace, bundle: str) -> dict[tuple[str, int], dict[str, Any]]:
    import ray
    from ray import serve

    from serving.client import wait_healthy
    from serving.core import ServedModel
    from raycluster.serve import run_server
    from serving.schema import Schema

    bodies = rank_bodies(args.candidates)
    raw = [json.dumps(b).encode() for b in bodies]
    res: dict[tuple[str, int], dict[str, Any]] = {}
    scorer = ServedModel(bundle)
    cols = [Schema(scorer.pp, 1000).rank_request(b)[0] for b in bodies]
    for c in args.concurrency:
        res["in-process", c] = inprocess_load(scorer, cols, c, args.duration, args.warmup)
        _report_point("in-process", c, res["in-process", c])

    # the peers and Serve up at once and measured alternately, so a neighbour's load hits all alike; Serve
    # twice, each on its own Ray: serve.ingress proxy (the default) and direct
    peers = {}
    for name in PEERS:
        port = free_port()
        peers[name] = (port, subprocess.Popen([sys.executable, __file__, "--peer-server", name, str(port),
                                               "--model", bundle]))
    try:
        for port, _ in peers.values():
            wait_healthy(f"http://127.0.0.1:{port}")
        for ingress in args.ingress:
            cfg = ServeConfig(port=free_port(), ingress=ingress)
            run_server(bundle, cfg, wait=False)  # starts a local Ray set up for this ingress
            try:
                targets = [(f"{n}/{ingress}", port, [p.pid]) for n, (port, p) in peers.items()]
                targets.append((f"serve/{ingress}", cfg.port, _serve_pids()))
                for c in args.concurrency:
                    for name, port, pids in targets:
                        res[name, c] = http_load(port, raw, c, args.duration, args.warmup, pids)
                        _report_point(name, c, res[name, c])
            finally:
                serve.shutdown()
                ray.shutdown()
    finally:
        for _, p in peers.values():
            p.terminate()
            p.wait()
    return res


PEERS = ("batched", "bare")  # the fair peer (a micro-batcher in front of the scorer), and without batching


def _report_point(name: str, c: int, r: dict[str, Any]) -> None:
    print(f"  {name:<10} c={c:<3} {r['qps']:8.1f} QPS  p50 {r['p50']:7.2f}  p99 {r['p99']:7.2f} ms  CPU {r['cpu_ms']:5.2f}"
          f" ms/req  non-200 {r['errors']}  (load {os.getloadavg()[0]:.1f})", flush=True)


def print_table(res: dict[tuple[str, int], dict[str, Any]], conc: list[int], ingress: list[str]) -> None:
    def cell(r: dict[str, Any]) -> str:
        return f"{r['qps']:>7.1f} {r['p50']:>6.1f} {r['p99']:>6.1f} {r['cpu_ms']:>5.2f}"

    def ratio(a: dict[str, Any], b: dict[str, Any]) -> str:
        return f"{a['qps'] / b['qps']:>5.2f} {a['p99'] / b['p99']:>5.2f} {a['cpu_ms'] / b['cpu_ms']:>5.2f}"

    head = f"{'QPS':>7} {'p50':>6} {'p99':>6} {'CPU':>5}"
    print(f"\n{'clients':>7} | {'in-process, c per batch':^27}")
    print(f"{'':>7} | {head}")
    for c in conc:
        print(f"{c:>7} | {cell(res['in-process', c])}")
    print(f"\n{'clients':>7} | {'serve.ingress':<13} | {'fair peer: FastAPI + batcher':^27} | "
          f"{'peer without batching':^27} | {'Ray Serve (rankray)':^27} | {'serve / fair peer':^17} | serve / unbatched")
    r3 = f"{'QPS':>5} {'p99':>5} {'CPU':>5}"
    print(f"{'':>7} | {'':<13} | {head} | {head} | {head} | {r3} | {r3}")
    for c in conc:
        for i in ingress:
            f, b, s = res[f"batched/{i}", c], res[f"bare/{i}", c], res[f"serve/{i}", c]
            print(f"{c:>7} | {i:<13} | {cell(f)} | {cell(b)} | {cell(s)} | {ratio(s, f)} | {ratio(s, b)}")
    print("latency in ms; CPU = server-side CPU ms per request (Serve: proxy + replica; in-process: this process); "
          "the peers are measured alternately with each Serve set-up")
    for c in [x for x in (16, 32) if x in conc] or conc[-1:]:
        ratios = [(res[f"serve/{i}", c]["qps"] / res[f"batched/{i}", c]["qps"],
                   res[f"serve/{i}", c]["p99"] / res[f"batched/{i}", c]["p99"]) for i in ingress]
        print(f"HEADLINE | `/rank` (100 candidates), {c} clients: Serve vs the fair peer (FastAPI + a micro-batcher "
              f"in front of the same scorer), serve.ingress {' / '.join(ingress)} | "
              f"{' / '.join(f'{q:.2f}x' for q, _ in ratios)} QPS, {' / '.join(f'{p:.2f}x' for _, p in ratios)} p99")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="bundle directory (default: build an untrained demo bundle)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=1.5, help="unmeasured seconds before each point")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 16, 32])
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--ingress", type=lambda s: s.split(","), default=["proxy", "direct"], help="serve.ingress modes")
    p.add_argument("--peer-server", nargs=2, metavar=("KIND", "PORT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.peer_server:
        serve_bare(args.model, int(args.peer_server[1]), batched=args.peer_server[0] == "batched")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.model or untrained_bundle(os.path.join(tmp, "bundle"))
        print(f"bundle {bundle}; {args.candidates} candidates per /rank; {args.duration:g} s per point; "
              f"{os.cpu_count()} CPUs", flush=True)
        res = run_all(args, bundle)
    print_table(res, args.concurrency, args.ingress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
