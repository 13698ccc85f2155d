"""Drift you can alert on (issue 20, item 5): the bundle stores its training distribution (drift.json), a
replica counts served values in the same bins, and /model and Ray's Prometheus export give per feature the
population stability index and the out-of-vocabulary rate, and the score's index. Training-like traffic
stays below 0.1; shifted traffic takes the shifted features above the documented alert level (0.2) while
the others stay low."""
from __future__ import annotations

import re
import time

import httpx
import pytest
import ray
from ray import serve

from serving.app import build_app
from tests.helpers import untrained_bundle
from training import synth
from training.config import ServeConfig
from training.drift import PSI_ALERT, psi

pytestmark = pytest.mark.usefixtures("ray_local")
APP = "drift"


def _send(http: httpx.Client, rows: list[dict]) -> dict:
    for k in range(0, len(rows), 100):
        r = http.post("/predict", json={"rows": rows[k:k + 100]})
        assert r.status_code == 200, r.text
    return http.get("/model").json()["drift"]


def _fields(table) -> list[dict]:
    return table.drop_columns([c for c in ("label", "p_true", "ts") if c in table.column_names]).to_pylist()


def test_psi_is_zero_for_the_same_shares_and_grows_with_the_shift():
    assert psi([0.5, 0.5], [0.5, 0.5]) == 0
    assert 0 < psi([0.5, 0.5], [0.6, 0.4]) < psi([0.5, 0.5], [0.9, 0.1])
    assert psi([1.0, 0.0], [0.0, 1.0]) > 1  # empty bins do not make it infinite


def test_shifted_traffic_raises_the_index_above_the_alert_level(serve_url, tmp_path):
    bundle = untrained_bundle(str(tmp_path / "model"))
    serve.run(build_app(bundle, ServeConfig(drift_window=1000), num_cpus=0.25), name=APP, route_prefix=f"/{APP}")
    try:
        with httpx.Client(base_url=f"{serve_url}/{APP}", timeout=60) as http:
            # rows of the same synthetic world as the bundle's training sample (generate_shard(20_000, 0, 0, 1))
            like = _send(http, _fields(synth.generate_shard(20_000, 0, 1, 10)))
            assert like["rows"] == 2000 and like["alert_above"] == PSI_ALERT
            assert max(f["psi"] for f in like["features"].values()) < 0.1, like["features"]
            assert like["score_psi"] < 0.1 and like["features"]["device"]["oov_rate"] < 0.01
            shifted = _fields(synth.generate_shard(20_000, 0, 2, 10))
            for r in shifted:
                r.update(hourly_rate=r["hourly_rate"] * 30, device="smart_tv", user_country="ZZ")
            drifted = _send(http, shifted)
            f = drifted["features"]
            assert min(f[x]["psi"] for x in ("hourly_rate", "device", "user_country")) > PSI_ALERT, f
            assert f["device"]["oov_rate"] > 0.8 and f["user_country"]["oov_rate"] > 0.8
            assert f["job_category"]["psi"] < 0.1 and f["budget"]["psi"] < 0.1  # untouched features stay low
            # the same figures reach Prometheus through Ray's metrics export
            port = ray._private.worker._global_node.metrics_export_port
            deadline, seen = time.time() + 90, None
            while time.time() < deadline:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
                seen = re.search(r'rankray_feature_psi\{[^}]*feature="device"[^}]*\} ([0-9.e+-]+)', text)
                if seen and float(seen.group(1)) > PSI_ALERT:
                    break
                time.sleep(3)
            assert seen and float(seen.group(1)) > PSI_ALERT, (port, seen and seen.group(0)[-300:],
                                                               [ln[:200] for ln in text.splitlines() if "psi" in ln][:4])
    finally:
        serve.delete(APP)
