"""serve.ingress `direct`: the one replica answers HTTP on serve.port itself (Serve's direct ingress, no
proxy hop), through `rankray serve`'s own start-up path (run_server), on a Ray it starts with the setting."""
import json
import os
import signal
import socket
import time

import httpx
import numpy as np
import psutil
import pytest
import ray
from ray import serve

from training.config import ServeConfig
from serving.client import wait_healthy
from raycluster.serve import ServeStartError, run_server
from tests.helpers import free_port as _free_port, burst_codes, untrained_bundle as make_bundle
from training import synth

pytestmark = pytest.mark.own_ray  # Serve reads the ingress mode when its processes start: a Ray of its own


@pytest.fixture(scope="module", autouse=True)
def _own_ray():
    ray.shutdown()  # the shared Ray, if an earlier module started it
    yield
    ray.shutdown()
from training.bundle import load_bundle

FIELDS = ("user_id", "user_country", "user_skills", "hourly_rate", "tier", "hour", "device",
          "job_id", "job_category", "job_skills", "budget", "client_country", "position")


def test_direct_ingress_is_one_replica():
    assert ServeConfig().ingress == "proxy"
    with pytest.raises(ValueError, match="serve.num_replicas is 2"):
        ServeConfig(ingress="direct", num_replicas=2)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("direct")
    return {"A": make_bundle(str(d / "a"), seed=0), "B": make_bundle(str(d / "b"), seed=1)}


@pytest.fixture(scope="module")
def cfg() -> ServeConfig:
    # a short queue so that overload shows; batches of up to 2
    return ServeConfig(ingress="direct", port=_free_port(), max_ongoing_requests=2, max_queued_requests=2, max_batch_size=2)


def test_a_taken_port_is_named_before_serve_retries(bundles, cfg):
    assert not ray.is_initialized()  # run_server starts this module's Ray, with the direct-ingress setting
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", cfg.port))
        taken.listen()
        with pytest.raises(ServeStartError, match=f"serve.port {cfg.port} on 127.0.0.1 is in use"):
            run_server(bundles["A"], cfg, wait=False)


@pytest.fixture(scope="module")
def url(bundles: dict[str, str], cfg: ServeConfig) -> str:
    url = run_server(bundles["A"], cfg, wait=False)
    yield url
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return synth.generate_shard(300, 5, 0, 1).select(list(FIELDS)).to_pylist()


def _listener(port: int) -> psutil.Process:
    for p in psutil.process_iter():
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in p.net_connections("tcp")):
                return p
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
    raise AssertionError(f"nothing listens on port {port}")


def test_the_replica_itself_answers_on_serve_port(url, cfg, bundles, rows):
    assert url == f"http://127.0.0.1:{cfg.port}"
    assert "ServeReplica:rankray:Ranker" in " ".join(_listener(cfg.port).cmdline())  # not Serve's proxy
    pp, model, _ = load_bundle(bundles["A"])
    got = httpx.post(f"{url}/predict", json={"rows": rows[:50]}, timeout=30).json()["scores"]
    from serving.core import ServedModel

    want = ServedModel(bundles["A"]).score({c: [r[c] for r in rows[:50]] for c in pp.input_columns})
    assert np.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("body, status, field", [
    (b"{not json", 400, "JSON"),
    (json.dumps({"rows": [{"user_id": "u1"}]}).encode(), 422, "rows[0]"),
    (json.dumps({"context": {}, "candidates": []}).encode(), 422, "candidates"),
])
def test_bad_requests_are_4xx_and_the_replica_stays(url, rows, body, status, field):
    path = "/rank" if b"candidates" in body else "/predict"
    r = httpx.post(url + path, content=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status and field in r.json()["detail"], r.text
    assert httpx.post(f"{url}/predict", json={"rows": rows[:3]}, timeout=30).status_code == 200


def test_a_killed_replica_comes_back_on_the_same_port(url, cfg, rows):
    victim = _listener(cfg.port)
    os.kill(victim.pid, signal.SIGKILL)
    t0 = time.monotonic()
    wait_healthy(url, 150)  # up to ~60 s: the kernel holds the port in TIME_WAIT for the dead replica's clients
    assert _listener(cfg.port).pid != victim.pid
    assert httpx.post(f"{url}/predict", json={"rows": rows[:3]}, timeout=30).status_code == 200
    print(f"direct replica back on port {cfg.port} after {time.monotonic() - t0:.1f} s")


def test_a_new_model_replaces_the_app_on_the_same_port(url, cfg, bundles, rows):
    before = httpx.get(f"{url}/model", timeout=30).json()["version"]
    t0 = time.monotonic()
    assert run_server(bundles["B"], cfg, wait=False) == url
    print(f"direct app replaced in {time.monotonic() - t0:.1f} s")
    after = httpx.get(f"{url}/model", timeout=30).json()["version"]
    assert after == str(load_bundle(bundles["B"])[2]["version"]) and after != before
    assert httpx.post(f"{url}/predict", json={"rows": rows[:3]}, timeout=30).status_code == 200


def test_overload_is_503_never_500(url, rows):
    """Last: refused requests leave the port in TIME_WAIT, which a replica started after them would wait out."""
    body = json.dumps({"rows": [rows[i % 300] for i in range(1000)]}).encode()
    codes = burst_codes(lambda: httpx.post(f"{url}/predict", content=body, timeout=60,
                                           headers={"Content-Type": "application/json"}))
    assert set(codes) <= {200, 503, 429}, codes
    assert codes.count(200) >= 1 and codes.count(503) + codes.count(429) >= 1, codes
