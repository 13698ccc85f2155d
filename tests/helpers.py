"""Test (and benchmark) helpers that are not fixtures: small tables, an untrained bundle, ports, bursts."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil
import pyarrow as pa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, "configs", "demo.yaml")
API_KEY_ENV = "RANKRAY_TEST_API_KEY"  # set (to a random key) before the shared Ray starts: replicas inherit it

SMALL_FEATURES = {
    "label": "clicked", "group": "user", "time": "ts",
    "features": [
        {"name": "user", "type": "categorical"},
        {"name": "item", "type": "categorical"},
        {"name": "color", "type": "categorical"},
        {"name": "tags", "type": "multi_hot", "sep": "|", "max_len": 4},
        {"name": "price", "type": "numeric", "transform": "log1p"},
    ],
}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def small_table(n: int = 4000, seed: int = 0) -> pa.Table:
    """Interactions with every feature kind; the label depends on user, item and the numeric."""
    rng = np.random.default_rng(seed)
    user = rng.integers(0, 60, n)
    item = rng.integers(0, 40, n)
    price = rng.lognormal(3, 1, n)
    tags = np.array(["a|b", "b", "c|d|e", "", "a|c|d|e|f|g"])[rng.integers(0, 5, n)]
    logit = np.where(user % 3 == item % 3, 1.5, -1.5) + 0.3 * np.log(price) - 1.0
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    color = np.array(["red", "green", "blue", None], dtype=object)[rng.integers(0, 4, n)]
    return pa.table({
        "user": user, "item": item, "price": price, "tags": tags, "color": color,
        "ts": np.arange(n, dtype=np.int64) * 60 + 1_700_000_000, "clicked": label,
    })


def burst_codes(send: Callable[[], Any], n: int = 24) -> list[int]:
    """Status codes of `n` calls of `send` released together; a 503 without Retry-After counts as -503."""
    codes: list[int] = []
    gate = threading.Barrier(n)

    def hit() -> None:
        gate.wait()
        r = send()
        codes.append(r.status_code if r.status_code != 503 or r.headers.get("retry-after") == "1" else -503)

    threads = [threading.Thread(target=hit) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return codes


def untrained_bundle(path: str, seed: int = 0, config: str = DEMO_CONFIG) -> str:
    """A serving bundle of the demo spec without training or Ray: the preprocessor fitted by training's own
    code on 20k synthetic rows, random weights drawn with `seed` (another seed: another model and version).
    For serving tests and benchmarks, whose speed does not depend on the weights."""
    import torch

    from training.bundle import save_bundle
    from training.config import load_config
    from training.data import SPLIT
    from training.drift import reference
    from training.models import build_model, model_arch
    from training.prepare import PartialStats, Stats, fit_preprocessor
    from training.scoring import fields_of, forward
    from training.synth import generate_shard

    cfg = load_config(config, ["data.generate=null"])
    table = generate_shard(20_000, 0, 0, 1)
    table = table.append_column(SPLIT, pa.array(np.zeros(len(table), np.int8)))
    pp = fit_preprocessor(Stats(PartialStats(cfg)(table).to_pandas()), cfg, table.schema)
    torch.manual_seed(seed)
    fields = fields_of(pp)
    model = build_model(cfg.model, fields, len(pp.num_columns))
    x_cat, x_num = pp.pack(pp.transform({c: table.column(c) for c in table.column_names}))
    save_bundle(path, cfg, pp, model, model_arch(cfg.model, fields, len(pp.num_columns)),
                metrics={"test_auc": 0.5}, samples=table.select(pp.input_columns).slice(0, 8).to_pylist(),
                drift=reference(pp, x_cat, x_num, forward(model, x_cat, x_num)))
    return path


@contextlib.contextmanager
def served(bundle: str, name: str) -> Iterator[None]:
    """The bundle as a Serve app on the run's shared Serve, under /NAME, deleted afterwards."""
    from ray import serve

    from serving.app import build_app
    from training.config import ServeConfig

    serve.run(build_app(bundle, ServeConfig(), num_cpus=0.5), name=name, route_prefix=f"/{name}")
    try:
        yield
    finally:
        serve.delete(name)


@contextlib.contextmanager
def ray_head(num_cpus: int = 2, env: dict | None = None, port: int | None = None,
             args: Sequence[str] = ()) -> Iterator[dict]:
    """A real head node started with the `ray` CLI (dashboard on 127.0.0.1, token auth on). `--block`
    keeps it tied to one process group, so teardown stops this cluster only (`ray stop` would stop
    every Ray on the machine). RAY_ADDRESS in the node's environment lets Ray's own helpers inside the
    cluster (e.g. Train's placement-group cleaner) find it even when another Ray runs on the machine."""
    dash, agent, agent_grpc, metrics, runtime_env = (free_port() for _ in range(5))
    port = port or free_port()
    env = {**os.environ, **(env or {}), "RAY_AUTH_MODE": "token", "RAY_ADDRESS": f"127.0.0.1:{port}"}
    ray_bin = str(Path(sys.executable).parent / "ray")
    proc = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             # own agent ports: another Ray on the machine must not hold the jobs agent's port
                             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                             f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
                             "--disable-usage-stats", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120  # the job agent comes up a little after the head
        cli_env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
        while subprocess.run([ray_bin, "job", "list", "--address", address], env=cli_env,
                             capture_output=True, timeout=60).returncode != 0:
            assert proc.poll() is None and time.time() < deadline, "ray start --head did not come up"
            time.sleep(2)
        yield {"gcs": f"127.0.0.1:{port}", "address": address, "env": cli_env, "bin": ray_bin}
    finally:
        # `ray start --block` spends ~34 s stopping its processes one by one after SIGTERM; the group is
        # this test's alone, so after a short grace it is killed whole
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def train_workers(raylet_pid: int) -> list[psutil.Process]:
    """Train worker processes of ONE Ray node (the raylet's children): other people's Ray on this
    machine runs processes with the same names."""
    out = []
    for p in psutil.Process(raylet_pid).children(recursive=True):
        try:
            if (p.cmdline() or [""])[0].startswith("ray::RayTrainWorker"):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return sorted(out, key=lambda p: p.pid)


def raylet_pid(node=None) -> int:
    import ray

    node = node or ray._private.worker._global_node
    return node.all_processes["raylet"][0].process.pid



def run_schemathesis(url: str, examples: int = 100) -> int:
    """schemathesis (the CLI, all its checks, a fixed seed) against the app at `url`'s /openapi.json; fails with
    its report unless it found nothing. Returns the number of test cases it generated."""
    out = subprocess.run([str(Path(sys.executable).parent / "st"), "run", f"{url}/openapi.json", "--checks", "all",
                          "--max-examples", str(examples), "--seed", "0", "--workers", "1", "--no-color"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0 and "No issues found" in out.stdout, out.stdout[-8000:] + out.stderr[-2000:]
    return int(re.search(r"(\d+) generated", out.stdout).group(1))


def job_submit(cmd: list[str], env: dict, cwd: Path | str) -> subprocess.CompletedProcess:
    """`ray job submit ...`, submitted again while the head's job agent is not up yet (right after `ray start`
    the jobs API can answer before it is)."""
    deadline = time.time() + 120
    while True:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=cwd)
        if "No available agent to submit job" not in out.stderr or time.time() > deadline:
            return out
        time.sleep(3)
