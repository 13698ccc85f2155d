"""The ranking model behind HTTP on Ray Serve: FastAPI ingress, dynamic batching, backpressure.

Nothing starts at import. `build_app(bundle_path, serve_cfg)` gives the Application for `serve.run`;
`app_builder(args)` is the same for `serve deploy serving/serve_config.yaml`.
"""
# no `from __future__ import annotations`: FastAPI must see real types through Serve's route wrappers

import copy
import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from training.config import ServeConfig, ServeVariant
from training.bundle import load_bundle
from serving.core import ServedModel, Service, score_assigned
from serving.schema import ErrorResponse, PredictRequest, PredictResponse, RankRequest, RankResponse, RequestError

log = logging.getLogger("rankray.serving")

api = FastAPI(title="rankray", description="Rank candidates with the trained CTR model.",
              docs_url=None, redoc_url=None, openapi_url=None)  # served below, behind the same auth

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": why}
    for code, why in [(400, "invalid JSON"), (401, "missing or wrong API key"), (413, "body too large"),
                      (422, "a field is missing or invalid (named in `detail`)"),
                      (503, "over capacity (queue full), retry later")]}


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    # the routes read raw bytes (validation by the feature spec is faster and names the field);
    # this only tells the OpenAPI page what the body looks like
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


@serve.deployment(ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class Ranker:
    """One replica: a self-checked bundle, its request schema and a batched scoring function."""

    def __init__(self, bundle_path: str, serve_cfg: ServeConfig | dict[str, Any] | None = None,
                 loader: Callable = load_bundle) -> None:
        cfg = ServeConfig.model_validate(serve_cfg or {}) if not isinstance(serve_cfg, ServeConfig) else serve_cfg
        # raises when the bundle fails its checks or its sample scores: Serve never marks the replica healthy
        variants = cfg.models or [ServeVariant(bundle=bundle_path, share=1.0)]
        load = functools.partial(ServedModel, loader=loader, ray_metrics=True, drift_window=cfg.drift_window)
        self.models = [load(v.bundle) for v in variants]
        self.shadow = load(cfg.shadow) if cfg.shadow else None
        self.served = self.models[0]
        self.service = Service(self.models, cfg, self._score_batch, shares=[v.share for v in variants],
                               shadow=self.shadow)
        self._score_batch.set_max_batch_size(cfg.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _score_batch(self, parts: list[tuple[int, dict[str, list[Any]]]]) -> list[np.ndarray | RequestError]:
        # kept off the routes: @serve.batch on a FastAPI route makes FastAPI expect a `requests` query field.
        # Scored inline on the replica's loop: a worker thread let requests trickle in one by one and
        # measured ~1.5 requests per batch instead of ~6 at 16 clients, at twice the CPU per request.
        return score_assigned(self.models, parts, self.shadow)

    @api.post("/rank", summary="Rank candidates for one context", openapi_extra=_body_doc(RankRequest),
              responses={200: {"model": RankResponse}, **_ERRORS})
    async def rank(self, request: Request) -> Response:
        return await self.service.rank(request)

    @api.post("/predict", summary="Score rows, in order", openapi_extra=_body_doc(PredictRequest),
              responses={200: {"model": PredictResponse}, **_ERRORS})
    async def predict(self, request: Request) -> Response:
        return await self.service.predict(request)

    @api.get("/healthz", summary="200 once the bundle is loaded and its self-check passed (no auth)")
    async def healthz(self) -> Response:
        return self.service.healthz()

    @api.get("/model", summary="Model version, metrics, features and live counters of this replica",
             responses={401: _ERRORS[401]})
    async def model(self, request: Request) -> Response:
        return await self.service.model(request)

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> Response:
        return self._guarded(request) or JSONResponse(
            self._openapi(request.app.openapi(), request.scope.get("root_path", "").rstrip("/")))

    def _openapi(self, doc: dict[str, Any], root: str) -> dict[str, Any]:
        """FastAPI's page with the request bodies of this bundle's feature spec: the schema is the validation,
        so generated clients and schema-driven fuzzers agree with the server. An app under a route prefix
        names it as its server."""
        doc = copy.deepcopy(doc)
        if root:
            doc["servers"] = [{"url": root}]
        schema = self.service.schema
        for path, body in (("/rank", schema.rank_body()), ("/predict", schema.predict_body())):
            doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"] = body
        return doc

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> Response:
        root = request.scope.get("root_path", "").rstrip("/")
        return self._guarded(request) or get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title="rankray")

    def _guarded(self, request: Request) -> Response | None:
        try:
            self.service.check(request)
        except RequestError as e:
            return JSONResponse({"detail": e.message}, status_code=e.status, headers={"WWW-Authenticate": "Bearer"})
        return None


def _local(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)  # replicas do not share the caller's working dir


def build_app(bundle_path: str, serve_cfg: ServeConfig | None = None, loader: Callable = load_bundle,
              num_cpus: float = 1.0) -> Application:
    """The Ranker application with replicas, concurrency and queue limits taken from `serve_cfg`."""
    cfg = serve_cfg or ServeConfig()
    if cfg.max_ongoing_requests < cfg.max_batch_size:
        log.warning("serve.max_ongoing_requests (%d) < serve.max_batch_size (%d): batches never fill",
                    cfg.max_ongoing_requests, cfg.max_batch_size)
    bundle_path = _local(bundle_path)
    cfg = cfg.model_copy(update={"models": [ServeVariant(bundle=_local(v.bundle), share=v.share) for v in cfg.models],
                                 "shadow": _local(cfg.shadow) if cfg.shadow else None})
    scale = {"autoscaling_config": cfg.autoscaling.model_dump()} if cfg.autoscaling else {"num_replicas": cfg.num_replicas}
    return Ranker.options(
        **scale,
        # Serve's default of 5 would cap each batch at 5 requests and starve it under load
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        backpressure_config={"status_code": 503, "retry_after_s": 1},  # beyond the queue: 503 + Retry-After
        ray_actor_options={"num_cpus": num_cpus},
    ).bind(bundle_path, cfg.model_dump(), loader)


class AppArgs(BaseModel):
    """`args:` of serving/serve_config.yaml."""
    model_config = ConfigDict(extra="forbid")
    bundle: str
    serve: ServeConfig = ServeConfig()
    num_cpus: float = 1.0


def app_builder(args: dict[str, Any]) -> Application:
    """Serve's application-builder entry point (`import_path: serving.app:app_builder`)."""
    a = AppArgs.model_validate(args)
    return build_app(a.bundle, a.serve, num_cpus=a.num_cpus)


app = app_builder  # `serve run serving.app:app bundle=...` works too
