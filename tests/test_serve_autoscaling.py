"""Replica autoscaling (issue 20, item 3): `serve.autoscaling` goes to Serve's autoscaling_config; under a
burst of /rank requests the replicas go up, and back down when it stops, with every request answered 200."""
from __future__ import annotations

import threading
import time

import httpx
import pytest
from ray import serve

from serving.app import build_app
from tests.helpers import untrained_bundle
from training import synth
from training.config import ConfigError, ServeConfig, load_config

pytestmark = pytest.mark.slow
APP = "autoscaled"


def _running(app: str) -> int:
    dep = serve.status().applications[app].deployments["Ranker"]
    return dep.replica_states.get("RUNNING", 0)


def test_replicas_follow_the_load_with_no_failed_request(serve_url, tmp_path):
    bundle = untrained_bundle(str(tmp_path / "model"))
    cfg = ServeConfig(autoscaling={"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2,
                                   "upscale_delay_s": 0.5, "downscale_delay_s": 2})
    serve.run(build_app(bundle, cfg, num_cpus=0.25), name=APP, route_prefix=f"/{APP}")
    rows = synth.generate_shard(40, 3, 0, 1).to_pylist()
    body = {"candidates": [{k: v for k, v in r.items() if k not in ("label", "p_true", "ts")} for r in rows]}
    codes: list[int] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=f"{serve_url}/{APP}", timeout=60) as http:
            while not stop.is_set():
                codes.append(http.post("/rank", json=body).status_code)

    try:
        assert _running(APP) == 1
        threads = [threading.Thread(target=client) for _ in range(12)]
        for t in threads:
            t.start()
        most, deadline = 1, time.time() + 60
        while most < 2 and time.time() < deadline:
            time.sleep(0.5)
            most = max(most, _running(APP))
        time.sleep(2)  # a little more load on the grown set
        stop.set()
        for t in threads:
            t.join()
        assert most >= 2, "the replicas never went up under load"
        assert codes and set(codes) == {200}, {c: codes.count(c) for c in set(codes)}
        deadline = time.time() + 120
        while _running(APP) > 1 and time.time() < deadline:
            time.sleep(1)
        assert _running(APP) == 1, "the replicas never came back down"
    finally:
        stop.set()
        serve.delete(APP)


def test_autoscaling_settings_are_checked_before_anything_starts(tmp_path):
    raw = {"run": {"name": "x", "dir": str(tmp_path)}, "data": {"source": "x.parquet"},
           "features": {"label": "y", "features": [{"name": "u", "type": "categorical"}]}}
    with pytest.raises(ConfigError, match=r"serve.autoscaling.max_replicas \(1\) is below min_replicas \(2\)"):
        load_config(raw={**raw, "serve": {"autoscaling": {"min_replicas": 2, "max_replicas": 1}}})
    with pytest.raises(ConfigError, match=r"serve.ingress 'direct' runs one replica"):
        load_config(raw={**raw, "serve": {"ingress": "direct", "autoscaling": {"max_replicas": 3}}})
