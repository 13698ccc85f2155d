"""What a serving process does, without Serve: load and self-check a bundle, score validated columns,
answer /rank, /predict and /model. The Serve deployment (serving/app.py) and the bare-uvicorn
baseline of benchmarks/bench_serve.py both run this code."""
from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import torch
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from training.bundle import load_bundle, verify_samples
from training.config import ServeConfig
from training.drift import DriftMonitor
from training.features import OOV, DataError, Preprocessor
from training.models import model_label
from training.scoring import score_columns
from serving.auth import ApiKeyGuard
from serving.metrics import Metrics
from serving.schema import RequestError, Schema, parse_json

log = logging.getLogger("rankray.serving")
# one JSON line per request a shadow model scored: under Serve's logger, so it lands in the replica's log
# (logs/serve/replica_*.log) at INFO
shadow_log = logging.getLogger("ray.serve.rankray.shadow")

Loader = Callable[[str], tuple[Preprocessor, torch.nn.Module, dict[str, Any]]]
ScoreFn = Callable[[tuple[int, dict[str, list[Any]]]], Awaitable[np.ndarray]]
SELF_CHECK_ATOL = 1e-5


class ServedModel:
    """A loaded bundle whose sample rows re-scored to their recorded scores (else construction fails),
    scored through training's one scoring path (`training.scoring.score_columns`)."""

    def __init__(self, bundle_path: str, loader: Loader = load_bundle, ray_metrics: bool = False,
                 torch_threads: int | None = 1, drift_window: int = 10_000) -> None:
        if torch_threads:
            # one request's forward is ~1 ms on one thread; extra intra-op threads only spin against the
            # HTTP side for the same cores (measured 27 ms instead of 0.7 ms on a busy 2-core machine)
            torch.set_num_threads(torch_threads)
        self.pp, self.model, self.meta = loader(bundle_path)
        # refuse to serve weights and preprocessing that do not reproduce training's scores
        self.self_check_diff = verify_samples(self.pp, self.model, self.meta, atol=SELF_CHECK_ATOL)
        self.version = str(self.meta.get("version"))
        self._oov_slots = {f.name: self.pp.slots(f) for f in self.pp.cat_features}
        self.metrics = Metrics(list(self._oov_slots), ray=ray_metrics, version=self.version)
        ref = self.meta.get("drift")  # a bundle from before drift.json has none
        self.drift = DriftMonitor(self.pp, ref, drift_window) if ref else None

    def score(self, columns: dict[str, list[Any]]) -> np.ndarray:
        """Click probabilities (float64) for validated columns; raises DataError on data the spec refuses."""
        return self._forward(columns)[0]

    def _forward(self, columns: dict[str, list[Any]]) -> tuple[np.ndarray, dict[str, int], dict[str, np.ndarray]]:
        p, enc = score_columns(self.pp, self.model, columns)
        oov = {f: int(sum(np.count_nonzero(enc[s] == OOV) for s in slots)) for f, slots in self._oov_slots.items()}
        return p.astype(np.float64), oov, enc

    def score_parts(self, parts: list[dict[str, list[Any]]]) -> list[np.ndarray | RequestError]:
        """Score several requests' columns in one forward pass and split the scores back. A request the
        preprocessor refuses gets its own RequestError; the others in the batch are still scored."""
        if len(parts) == 1:
            sizes, merged = [len(next(iter(parts[0].values())))], parts[0]
        else:
            sizes = [len(next(iter(p.values()))) for p in parts]
            merged = {c: list(itertools.chain.from_iterable(p[c] for p in parts)) for c in parts[0]}
        try:
            scores, oov, enc = self._forward(merged)
        except DataError as e:
            if len(parts) == 1:
                return [RequestError(422, str(e))]
            return [r for p in parts for r in self.score_parts([p])]
        self.metrics.batch(len(parts), scores, oov)
        if self.drift is not None:
            self.drift.update(*self.pp.pack(enc), scores)
            self.metrics.drift(self.drift)
        return np.split(scores, np.cumsum(sizes)[:-1])

    def info(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "created_at": self.meta.get("created_at"),
            "model": model_label(self.meta["arch"]),
            "metrics": _finite(self.meta.get("metrics", {})),
            "features": [{"name": f.name, "type": f.type, "field": f.column} for f in self.pp.spec.features],
            "self_check_max_diff": self.self_check_diff,
            "drift": self.drift.report() if self.drift is not None else None,
        }


def _finite(x: Any) -> Any:
    """NaN/inf -> None: the answer must stay strict JSON (training metrics can be NaN)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def score_assigned(models: list[ServedModel], parts: list[tuple[int, dict[str, list[Any]]]],
                   shadow: ServedModel | None = None) -> list[np.ndarray | RequestError]:
    """Requests (model index, columns) scored together per model, in their order; a shadow model then scores
    every request too, and its scores are logged (and counted), never returned."""
    out: list[Any] = [None] * len(parts)
    for i in dict.fromkeys(k for k, _ in parts):
        idx = [j for j, (k, _) in enumerate(parts) if k == i]
        for j, r in zip(idx, models[i].score_parts([parts[j][1] for j in idx])):
            out[j] = r
    if shadow is not None:
        for (i, _), mine, theirs in zip(parts, shadow.score_parts([c for _, c in parts]), out):
            if isinstance(mine, Exception):  # a request the shadow cannot score is its problem alone
                continue
            answered = None if isinstance(theirs, Exception) else np.round(theirs, 6).tolist()
            shadow_log.info(json.dumps({"shadow": shadow.version, "answered_by": models[i].version,
                                        "scores": np.round(mine, 6).tolist(), "answered": answered}))
    return out


class Service:
    """HTTP handlers over one ServedModel, or several answering their shares of the requests (A/B: smooth
    weighted round robin, so the split is exact, not random); `score_fn` gets (model index, columns) and is
    where Serve plugs in its batching."""

    def __init__(self, served: ServedModel | list[ServedModel], cfg: ServeConfig, score_fn: ScoreFn,
                 guard: ApiKeyGuard | None = None, shares: list[float] | None = None,
                 shadow: ServedModel | None = None) -> None:
        self.models = served if isinstance(served, list) else [served]
        self.served = self.models[0]
        self.shares = np.asarray(shares or [1.0] * len(self.models), np.float64)
        self.shares /= self.shares.sum()
        self._credit = np.zeros(len(self.models))
        self.shadow = shadow
        self.cfg = cfg
        self.score_fn = score_fn
        self.guard = guard if guard is not None else ApiKeyGuard.from_env(cfg.api_key_env)
        self.schemas = [Schema(m.pp, cfg.max_candidates) for m in self.models]
        self.schema = self.schemas[0]

    def _pick(self) -> int:
        self._credit += self.shares
        i = int(np.argmax(self._credit))
        self._credit[i] -= 1.0
        return i

    async def _body(self, request: Request) -> Any:
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"body: {declared} bytes, more than the limit of {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"body: more than the limit of {limit} bytes")
            chunks.append(chunk)
        return parse_json(b"".join(chunks))

    async def _handle(self, endpoint: str, request: Request,
                      work: Callable[[Any, int], Awaitable[dict[str, Any]]], needs_body: bool = True) -> Response:
        t0 = time.perf_counter()
        i = self._pick() if needs_body else 0  # the model that answers this request
        try:
            self.guard.check(request.headers.get("authorization"))
            out = await work(await self._body(request) if needs_body else None, i)
            resp: Response = Response(json.dumps(out).encode(), media_type="application/json")
        except RequestError as e:
            headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
            resp = JSONResponse({"detail": e.message}, status_code=e.status, headers=headers)
        except Exception:  # noqa: BLE001 - a bug, not bad input: log it, answer 500, keep the replica up
            log.exception("%s failed", endpoint)
            resp = JSONResponse({"detail": "internal error"}, status_code=500)
        self.models[i].metrics.request(endpoint, resp.status_code, (time.perf_counter() - t0) * 1000)
        return resp

    async def _scores(self, columns: dict[str, list[Any]], key: str, i: int) -> np.ndarray:
        out = await self.score_fn((i, columns))
        if isinstance(out, Exception):
            raise out
        if not np.isfinite(out).all():  # never answer NaN (not JSON, and it would break the ranking)
            raise self._unscorable(columns, out, key, self.models[i].pp)
        return out

    def _unscorable(self, columns: dict[str, list[Any]], scores: np.ndarray, key: str,
                    pp: Preprocessor) -> RequestError:
        """A 422 naming the first item without a finite score and its numeric field farthest from training's
        range: finite but huge numbers (e.g. position=1e15) overflow float32 inside the model."""
        i = int(np.flatnonzero(~np.isfinite(scores))[0])
        dist: dict[str, float] = {}
        for f in pp.num_features:
            v = columns[f.column][i]
            if type(v) in (int, float):
                dist[f.column] = max(dist.get(f.column, 0.0), float(abs(pp.standardize(f, np.array([float(v)]))[0])))
        where = f"{key}[{i}]"
        if dist:
            c = max(dist, key=dist.__getitem__)
            return RequestError(422, f"{where}.{c}: value {columns[c][i]!r} is too far outside the training "
                                     "range: the model gives no finite score")
        return RequestError(422, f"{where}: the model gives no finite score for this item")

    async def _rank(self, body: Any, i: int) -> dict[str, Any]:
        columns, ids, top_k, absent = self.schemas[i].rank_request(body)
        scores = await self._scores(columns, "candidates", i)
        order = np.argsort(-scores, kind="stable")[:top_k]
        return {"model_version": self.models[i].version,
                "results": [{"index": i, "id": ids[i], "score": s} for i, s in zip(order.tolist(), scores[order].tolist())],
                **({"absent": absent} if absent else {})}

    async def _predict(self, body: Any, i: int) -> dict[str, Any]:
        scores = await self._scores(self.schemas[i].predict_request(body), "rows", i)
        return {"model_version": self.models[i].version, "scores": scores.tolist()}

    async def _model(self, _: Any, __: int) -> dict[str, Any]:
        return {**self.served.info(), "request_fields": self.schema.fields,
                "limits": {k: getattr(self.cfg, k) for k in ("max_candidates", "max_body_bytes", "max_batch_size",
                                                             "batch_wait_timeout_s", "max_ongoing_requests",
                                                             "max_queued_requests")},
                "auth": self.guard.enabled, "counters": self.served.metrics.snapshot(),
                # A/B: every model with its share and counters; the shadow's counters (its scores are in the log)
                "models": [{"version": m.version, "share": float(s), "counters": m.metrics.snapshot()}
                           for m, s in zip(self.models, self.shares)],
                "shadow": None if self.shadow is None else {"version": self.shadow.version,
                                                            "counters": self.shadow.metrics.snapshot()}}

    async def rank(self, request: Request) -> Response:
        return await self._handle("rank", request, self._rank)

    async def predict(self, request: Request) -> Response:
        return await self._handle("predict", request, self._predict)

    async def model(self, request: Request) -> Response:
        return await self._handle("model", request, self._model, needs_body=False)

    def healthz(self) -> Response:
        return JSONResponse({"status": "ok", "version": self.served.version})

    def check(self, request: Request) -> None:
        self.guard.check(request.headers.get("authorization"))
