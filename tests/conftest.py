"""Shared fixtures: one local Ray per test module, a moto S3 server on loopback, small datasets."""
from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pytest

import raycluster  # noqa: F401 - sets RAY_AUTH_MODE before ray is imported


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


@pytest.fixture(scope="module")
def ray_local(s3_server: str) -> Iterator[None]:
    """Ray started after the S3 server so its workers inherit the AWS_* variables."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("AWS_")}})
    yield
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3 protocol server (moto, server mode) on loopback; credentials via AWS_* variables."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield url
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
