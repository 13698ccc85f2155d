"""Serving on a real local Ray + Serve, over real HTTP: offline/online score parity, validation, auth,
backpressure, health. The bundle is untrained (scores are what they are; parity is what is tested)."""
import hashlib
import json
import os
import pathlib
import shutil

import httpx
import numpy as np
import pytest
import yaml

from ray import serve
from ray.serve.schema import ServeDeploySchema

from raycluster.cli import build_parser, cmd_serve
from training.config import ServeConfig
from serving import client
from serving.app import Ranker, app_builder, build_app
from serving.core import ServedModel
from serving.schema import RequestError, Schema
from training import synth
from training.bundle import BundleError, load_bundle
from training.scoring import score_rows
from training.features import DataError

from tests.helpers import API_KEY_ENV, burst_codes, run_schemathesis, untrained_bundle as make_bundle

KEY_ENV = API_KEY_ENV
CONTEXT = ("user_id", "user_country", "user_skills", "hourly_rate", "tier", "hour", "device")


def _tampered(src: str, dst: str) -> str:
    """A copy whose recorded sample scores no longer match its weights (checksums kept valid)."""
    d = pathlib.Path(shutil.copytree(src, dst))
    samples = json.loads((d / "samples.json").read_text())
    samples["scores"] = [s + 0.01 for s in samples["scores"]]
    blob = json.dumps(samples).encode()
    (d / "samples.json").write_bytes(blob)
    man = json.loads((d / "manifest.json").read_text())
    man["files"]["samples.json"] = {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
    (d / "manifest.json").write_text(json.dumps(man))
    return dst


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_bundle(str(tmp_path_factory.mktemp("serving") / "model"))


@pytest.fixture(scope="module")
def offline(bundle: str):
    return load_bundle(bundle)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return synth.generate_shard(400, 5, 0, 1).select(list(CONTEXT) + [
        "job_id", "job_category", "job_skills", "budget", "client_country", "position"]).to_pylist()


@pytest.fixture(scope="module")
def server(bundle: str, serve_url: str):
    """Two apps on the shared Serve: `/` open; `/guarded` with an API key (in the environment the replicas
    inherited) and a one-request queue."""
    serve.run(build_app(bundle, ServeConfig(max_candidates=64, max_body_bytes=100_000), num_cpus=0.5),
              name="rankray", route_prefix="/")
    tight = ServeConfig(api_key_env=KEY_ENV, max_ongoing_requests=1, max_queued_requests=1, max_batch_size=1)
    serve.run(build_app(bundle, tight, num_cpus=0.5), name="guarded", route_prefix="/guarded")
    with httpx.Client(base_url=serve_url, timeout=60) as http:
        yield {"url": serve_url, "http": http, "key": os.environ[KEY_ENV]}
    serve.delete("rankray")
    serve.delete("guarded")


def _rank_body(rows: list[dict], n: int = 40, start: int = 0) -> dict:
    chunk = rows[start:start + n]
    ctx = {f: chunk[0][f] for f in CONTEXT}
    cands = [{"id": f"c{i}", **{k: v for k, v in r.items() if k not in CONTEXT}} for i, r in enumerate(chunk)]
    return {"context": ctx, "candidates": cands, "top_k": n}


def test_predict_equals_offline_scores(server, offline, rows):
    pp, model, meta = offline
    batch = rows[:50] + meta["samples"]["rows"]
    scores = client.predict(server["url"], batch)
    want = score_rows(pp, model, batch)
    assert np.abs(np.array(scores) - want).max() < 1e-5
    assert np.abs(np.array(scores[50:]) - np.array(meta["samples"]["scores"])).max() < 1e-5


def test_rank_order_equals_sorted_offline_scores(server, offline, rows):
    pp, model, _ = offline
    body = _rank_body(rows, 40, start=100)
    body["candidates"][3]["device"] = "ios" if body["context"]["device"] != "ios" else "web"  # candidate wins
    body["top_k"] = 25
    out = client.rank(server["url"], body["context"], body["candidates"], top_k=25)
    merged = [{**body["context"], **c} for c in body["candidates"]]
    want = score_rows(pp, model, merged)
    assert [r["index"] for r in out["results"]] == np.argsort(-want, kind="stable")[:25].tolist()
    assert all(r["id"] == f"c{r['index']}" and abs(r["score"] - want[r["index"]]) < 1e-5 for r in out["results"])
    assert out["model_version"] == offline[2]["version"]


def _cand(rows: list[dict], i: int = 0, **change) -> dict:  # one valid candidate, changed
    return {**rows[i], **change}


def _ok(rows: list[dict], drop: str | None = None) -> list[dict]:
    """Four valid candidates; `drop` removes that field from the last one."""
    return [{k: v for k, v in r.items() if i < 3 or k != drop} for i, r in enumerate(rows[:4])]


# (name, path, body from rows (bytes or JSON-able), status, text the message must contain)
BAD = [
    ("invalid json", "/rank", lambda r: b'{"candidates": [', 400, "body: invalid JSON"),
    ("not an object", "/rank", lambda r: [1, 2], 422, "body: must be a JSON object"),
    ("no candidates", "/rank", lambda r: {"context": {}}, 422, "candidates: missing"),
    ("empty candidates", "/rank", lambda r: {"candidates": []}, 422, "candidates: must not be empty"),
    ("candidates not list", "/rank", lambda r: {"candidates": {"a": 1}}, 422, "candidates: must be a list"),
    ("too many", "/rank", lambda r: {"candidates": _ok(r)[:1] * 65}, 422, "candidates: 65 items, more than the limit of 64"),
    ("candidate not object", "/rank", lambda r: {"candidates": [_cand(r), 7]}, 422, "candidates[1]: must be an object"),
    ("numeric as string", "/rank", lambda r: {"candidates": [_cand(r, budget="12")]}, 422,
     "candidates[0].budget: must be a number, got a string"),
    ("NaN", "/rank", lambda r: json.dumps({"candidates": _ok(r)[:2] + [_cand(r, budget=float("nan"))]}).encode(), 422,
     "candidates[2].budget: must be a finite number (got NaN)"),
    ("Infinity in context", "/rank", lambda r: b'{"context": {"hourly_rate": -Infinity}, "candidates": '
     + json.dumps(_ok(r)).encode() + b"}", 422, "context.hourly_rate: must be a finite number (got -Infinity)"),
    ("overflow to inf", "/rank", lambda r: json.dumps({"candidates": _ok(r)}).replace(
        '"position": ', '"position": 1e999, "x": ', 1).encode(), 422, "candidates[0].position: must be a finite number"),
    ("boolean number", "/rank", lambda r: {"candidates": [_cand(r, position=True)]}, 422,
     "candidates[0].position: must be a number, got a boolean"),
    ("huge integer id", "/rank", lambda r: {"candidates": [_cand(r, job_id=10**30)]}, 422,
     "candidates[0].job_id: integer out of the 64-bit range"),
    ("integer past float", "/rank", lambda r: {"candidates": [_cand(r, budget=10**400)]}, 422,
     "candidates[0].budget: must be a finite number (got an integer of 401 digits)"),
    ("object category", "/rank", lambda r: {"candidates": [_cand(r, device={"a": 1})]}, 422,
     "candidates[0].device: must be a string, integer or boolean, got an object"),
    ("float category", "/rank", lambda r: {"candidates": [_cand(r, tier=1.5)]}, 422, "candidates[0].tier: must be a string"),
    ("bad multi_hot item", "/rank", lambda r: {"context": {"user_skills": ["a", [1]]}, "candidates": _ok(r)}, 422,
     "context.user_skills: list items must be strings, integers or null"),
    ("context not object", "/rank", lambda r: {"context": [1], "candidates": _ok(r)}, 422, "context: must be an object"),
    ("top_k zero", "/rank", lambda r: {"candidates": _ok(r), "top_k": 0}, 422, "top_k: must be an integer >= 1"),
    ("top_k string", "/rank", lambda r: {"candidates": _ok(r), "top_k": "3"}, 422, "top_k: must be an integer"),
    ("id object", "/rank", lambda r: {"candidates": [_cand(r, id={"x": 1})]}, 422, "candidates[0].id: must be a string"),
    ("rows missing", "/predict", lambda r: {"candidates": _ok(r)}, 422, "rows: missing"),
    ("row missing field", "/predict", lambda r: {"rows": [_cand(r), {"budget": 3}]}, 422, "rows[1].user_id: missing"),
    ("body too large", "/predict", lambda r: {"rows": _ok(r), "pad": "x" * 120_000}, 413, "body: "),
]


@pytest.mark.parametrize("name,path,make,status,text", BAD, ids=[b[0] for b in BAD])
def test_bad_request_is_4xx_naming_the_field_and_replica_survives(server, rows, name, path, make, status, text):
    http = server["http"]
    body = make(rows)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = http.post(path, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, (r.status_code, r.text)
    assert text in r.json()["detail"], r.json()
    good = http.post("/rank", json=_rank_body(rows, 5))
    assert good.status_code == 200, good.text


def test_unseen_categories_are_scored_and_counted(server, rows):
    http = server["http"]
    before = http.get("/model").json()["counters"]["oov"]
    body = _rank_body(rows, 6)
    for c in body["candidates"]:
        c.update(job_category="never-seen", job_id="not-a-number", job_skills=["skill_x", "skill_01"])
    r = http.post("/rank", json=body)
    assert r.status_code == 200, r.text
    after = http.get("/model").json()["counters"]["oov"]
    assert after["job_category"] - before["job_category"] == 6
    assert after["job_id"] - before["job_id"] == 6  # text for an integer vocabulary is out of vocabulary
    assert after["job_skills"] - before["job_skills"] == 6


def test_api_key(server, rows):
    http, key = server["http"], server["key"]
    body = _rank_body(rows, 3)
    assert http.post("/guarded/rank", json=body).status_code == 401
    bad = key[:-1] + ("y" if key.endswith("x") else "x")  # one character off (never the key itself)
    wrong = http.post("/guarded/rank", json=body, headers={"Authorization": "Bearer " + bad})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert http.post("/guarded/rank", json=body, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert http.get("/guarded/healthz").status_code == 200
    for path in ("/guarded/model", "/guarded/docs", "/guarded/openapi.json"):
        assert http.get(path).status_code == 401, path
    info = http.get("/guarded/model", headers={"Authorization": f"Bearer {key}"}).json()
    assert info["auth"] is True and key not in json.dumps(info)
    with pytest.raises(client.RankrayError) as e:
        client.rank(server["url"] + "/guarded", body["context"], body["candidates"], api_key="nope")
    assert e.value.status == 401


def test_overload_is_503_never_500(server, rows):
    http, key = server["http"], server["key"]
    body = json.dumps({"rows": [rows[i % 400] for i in range(1000)]}).encode()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    codes = burst_codes(lambda: http.post("/guarded/predict", content=body, headers=headers))
    assert set(codes) <= {200, 503, 429}, codes
    assert codes.count(200) >= 1 and codes.count(503) + codes.count(429) >= 1, codes
    assert http.post("/guarded/predict", content=body, headers=headers).status_code == 200


def test_rank_field_absent_from_context_and_candidate_is_null_and_named(server, offline, rows):
    """A field may come once in the context; one given nowhere is scored as null (as an explicit null) and named
    in `absent`, so the published schema can say exactly what is accepted."""
    pp, model, _ = offline
    body = _rank_body(rows, 6, start=20)
    body["candidates"][2].pop("budget")
    body["context"].pop("device")
    out = server["http"].post("/rank", json=body).json()
    assert sorted(out["absent"]) == ["budget", "device"]
    merged = [{**body["context"], "device": None, **c} for c in body["candidates"]]
    merged[2]["budget"] = None
    want = score_rows(pp, model, merged)
    assert {r["index"]: r["score"] for r in out["results"]} == pytest.approx(dict(enumerate(want)), abs=1e-5)
    assert "absent" not in server["http"].post("/rank", json=_rank_body(rows, 6, start=20)).json()


def test_openapi_schema_is_the_validation(server, rows):
    """Issue 20, item 6: each feature a typed property from the bundle's spec (required in /predict rows), the
    candidate limit as maxItems; schemathesis with all its checks (schema-valid requests accepted, invalid ones
    refused, responses as documented) finds nothing."""
    doc = server["http"].get("/openapi.json").json()
    body = lambda path: doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]  # noqa: E731
    cands = body("/rank")["properties"]["candidates"]
    assert (cands["minItems"], cands["maxItems"]) == (1, 64)
    predict_rows = body("/predict")["properties"]["rows"]["items"]
    assert sorted(predict_rows["required"]) == sorted(rows[0])
    props = predict_rows["properties"]
    assert props["budget"]["type"] == ["number", "null"] and props["budget"]["maximum"] > 1e308
    assert props["user_id"]["type"] == ["integer", "string", "boolean", "null"] and props["user_id"]["maximum"] == 2**63 - 1
    assert "array" in props["job_skills"]["type"] and "joined with '|'" in props["job_skills"]["description"]
    assert run_schemathesis(server["url"]) > 100


def test_healthz_model_and_docs(server, offline, rows):
    http = server["http"]
    pp, _, meta = offline
    assert http.post("/rank", json=_rank_body(rows, 5)).status_code == 200
    assert http.get("/healthz").json() == {"status": "ok", "version": meta["version"]}
    info = http.get("/model").json()
    assert info["version"] == meta["version"] and info["created_at"] == meta["created_at"]
    assert info["metrics"] == {"test_auc": 0.5} and info["model"] == "dcnv2"
    assert [(f["name"], f["type"]) for f in info["features"]] == [(f.name, f.type) for f in pp.spec.features]
    assert info["request_fields"] == pp.input_columns and info["self_check_max_diff"] <= 1e-5
    c = info["counters"]
    assert c["rows_scored"] > 0 and c["batches"] > 0 and 0 < c["mean_score"] < 1
    assert any(r["endpoint"] == "rank" and r["code"] == 200 for r in c["requests"])
    assert "/rank" in http.get("/openapi.json").json()["paths"]
    assert "swagger" in http.get("/docs").text.lower()


def test_bundle_failing_its_self_check_never_serves(server, bundle, tmp_path):
    bad = _tampered(bundle, str(tmp_path / "bad"))
    with pytest.raises(BundleError, match="samples.json: model scores differ"):
        ServedModel(bad, torch_threads=None)
    with pytest.raises(RuntimeError, match="broken failed"):  # the replica's constructor raises
        serve.run(Ranker.options(max_constructor_retry_count=1, ray_actor_options={"num_cpus": 0.1})
                  .bind(bad, {}), name="broken", route_prefix="/broken")
    assert "samples.json: model scores differ" in serve.status().applications["broken"].deployments["Ranker"].message
    assert server["http"].get("/broken/healthz").status_code != 200
    serve.delete("broken")
    assert server["http"].get("/healthz").status_code == 200  # the other apps are untouched


def test_data_error_fails_only_its_own_request(bundle, rows):
    scorer = ServedModel(bundle, torch_threads=None)  # leave this process's torch threads alone
    transform = scorer.pp.transform

    def picky(batch):
        if "poison" in list(batch["device"]):
            raise DataError("column 'device': poison")
        return transform(batch)

    scorer.pp.transform = picky
    schema = Schema(scorer.pp, 100)
    parts = [schema.predict_request({"rows": [dict(r, device=d) for r in rows[:3]]}) for d in ("ios", "poison", "web")]
    out = scorer.score_parts(parts)
    assert isinstance(out[1], RequestError) and out[1].status == 422 and "device" in out[1].message
    assert np.allclose(out[0], scorer.score(parts[0])) and np.allclose(out[2], scorer.score(parts[2]))


def test_serve_config_yaml_builder_and_cli(bundle):
    raw = yaml.safe_load(open("serving/serve_config.yaml"))
    cfg = ServeDeploySchema.model_validate(raw)
    app_cfg = cfg.applications[0]
    assert app_cfg.import_path == "serving.app:app_builder" and cfg.http_options.host == "127.0.0.1"
    assert app_builder({**app_cfg.args, "bundle": bundle}) is not None
    with pytest.raises(Exception, match="max_batch_size"):
        app_builder({"bundle": bundle, "serve": {"max_batch_size": 0}})
    args = build_parser().parse_args(["serve", "--model", bundle, "--port", "9001", "--no-wait"])
    assert args.fn is cmd_serve and args.port == 9001 and args.no_wait and args.config is None
