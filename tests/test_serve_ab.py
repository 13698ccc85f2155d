"""Two model versions at once (issue 20, item 4): `serve.models` splits the requests by share (A/B), the
response names the version that answered; a `serve.shadow` bundle scores every request too, its scores
logged and counted, never returned; per-version counters; promoting B to 100% is a redeploy with another
config, under load, with no failed request."""
from __future__ import annotations

import glob
import json
import os
import threading
from collections import Counter

import httpx
import pytest
import ray
from ray import serve

from serving.app import build_app
from tests.helpers import untrained_bundle
from training import synth
from training.bundle import load_bundle
from training.config import ConfigError, ServeConfig, load_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]
APP = "ab"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("ab")
    return {k: untrained_bundle(str(d / k), seed=s) for k, s in (("A", 0), ("B", 1), ("C", 2))}


def _versions(bundles: dict[str, str]) -> dict[str, str]:
    return {k: load_bundle(p)[2]["version"] for k, p in bundles.items()}


def _rows(n: int) -> list[dict]:
    t = synth.generate_shard(20_000, 0, 3, 10)
    return t.drop_columns(["label", "p_true", "ts"]).slice(0, n).to_pylist()


def _load(url: str, rows: list[dict], n: int, threads: int = 4) -> list[tuple[int, dict]]:
    out: list[tuple[int, dict]] = []

    def client(k: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            for i in range(k, n, threads):
                r = http.post("/predict", json={"rows": rows[i % (len(rows) - 1):][:2]})  # 2 rows each
                out.append((r.status_code, r.json()))

    ts = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out


def test_ab_split_shadow_logged_never_returned_and_promotion_without_a_failed_request(serve_url, bundles):
    v = _versions(bundles)
    assert len(set(v.values())) == 3
    url = f"{serve_url}/{APP}"
    ab = ServeConfig(models=[{"bundle": bundles["A"], "share": 0.8}, {"bundle": bundles["B"], "share": 0.2}],
                     shadow=bundles["C"])
    serve.run(build_app(bundles["A"], ab, num_cpus=0.25), name=APP, route_prefix=f"/{APP}")
    try:
        rows = _rows(200)
        got = _load(url, rows, 1000)
        assert {c for c, _ in got} == {200}
        by = Counter(body["model_version"] for _, body in got)
        assert set(by) == {v["A"], v["B"]}  # the shadow never answers
        assert abs(by[v["A"]] / 1000 - 0.8) <= 0.05, by
        assert all(set(body) == {"model_version", "scores"} for _, body in got)  # no shadow scores returned
        info = httpx.get(f"{url}/model", timeout=30).json()
        assert [m["version"] for m in info["models"]] == [v["A"], v["B"]]
        assert sum(m["counters"]["rows_scored"] for m in info["models"]) == 2000
        assert info["shadow"]["version"] == v["C"] and info["shadow"]["counters"]["rows_scored"] == 2000
        # the shadow's scores are in the replica's log, one JSON line per request
        logs = glob.glob(os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs", "serve",
                                      "replica_*ab*"))
        lines = [ln for f in logs for ln in open(f, errors="replace") if '"shadow": "' + v["C"] in ln]
        assert len(lines) >= 1000, (logs, len(lines))
        rec = json.loads(lines[0][lines[0].index("{"):])
        assert len(rec["scores"]) == 2 and rec["answered_by"] in (v["A"], v["B"])

        # promotion: B takes every request, a config change redeployed under load
        done = threading.Event()
        during: list[tuple[int, dict]] = []

        def keep_loading() -> None:
            while not done.is_set():
                during.extend(_load(url, rows, 40, threads=2))

        t = threading.Thread(target=keep_loading)
        t.start()
        serve.run(build_app(bundles["B"], ServeConfig(models=[{"bundle": bundles["B"], "share": 1.0}]),
                            num_cpus=0.25), name=APP, route_prefix=f"/{APP}")
        after = _load(url, rows, 40)
        done.set()
        t.join()
        assert during and {c for c, _ in during} == {200}, Counter(c for c, _ in during)
        assert {b["model_version"] for _, b in after} == {v["B"]}
    finally:
        serve.delete(APP)


def test_shares_must_add_up_to_one(tmp_path):
    raw = {"run": {"name": "x", "dir": str(tmp_path)}, "data": {"source": "x.parquet"},
           "features": {"label": "y", "features": [{"name": "u", "type": "categorical"}]},
           "serve": {"models": [{"bundle": "a", "share": 0.5}, {"bundle": "b", "share": 0.4}]}}
    with pytest.raises(ConfigError, match="serve.models: the shares add up to 0.9, not 1"):
        load_config(raw=raw)
