"""Live counters of one serving process, mirrored to Ray metrics (Prometheus) inside a Serve replica."""
from __future__ import annotations

import collections
import threading
import time
from typing import Any

import numpy as np

LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]
WINDOW = 2048  # recent latencies kept per endpoint for the p50/p99 shown by /model


class Metrics:
    """Request, batch, out-of-vocabulary and score counters. `ray=True` also records them as
    `ray.serve.metrics` (tagged with deployment, replica and application by Serve)."""

    def __init__(self, features: list[str], ray: bool = False, version: str = "") -> None:
        self._lock = threading.Lock()  # the batch may be scored off the event loop's thread
        self.started = time.time()
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.latency: dict[str, collections.deque[float]] = collections.defaultdict(lambda: collections.deque(maxlen=WINDOW))
        self.batches = self.batch_requests = self.rows = 0
        self.score_sum = 0.0
        self.oov: dict[str, int] = dict.fromkeys(features, 0)
        self._ray: dict[str, Any] | None = self._ray_metrics() if ray else None
        self._v = {"version": version}  # several models in one replica (A/B, shadow): their series apart

    @staticmethod
    def _ray_metrics() -> dict[str, Any]:
        from ray.serve.metrics import Counter, Gauge, Histogram

        return {
            "requests": Counter("rankray_requests_total", "HTTP requests by endpoint and status code",
                                tag_keys=("endpoint", "code", "version")),
            "latency": Histogram("rankray_request_latency_ms", "request latency in the replica (ms)",
                                 boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("endpoint", "version")),
            "batch": Histogram("rankray_batch_requests", "requests scored together in one batch",
                               boundaries=BATCH_BOUNDARIES, tag_keys=("version",)),
            "rows": Counter("rankray_rows_scored_total", "rows (candidates) scored", tag_keys=("version",)),
            "oov": Counter("rankray_oov_total", "out-of-vocabulary (unseen or null) values by feature",
                           tag_keys=("feature", "version")),
            "mean_score": Gauge("rankray_mean_score", "mean score of all rows scored by this replica",
                                tag_keys=("version",)),
            "psi": Gauge("rankray_feature_psi", "population stability index of served values against training "
                         "(alert above 0.2), by feature", tag_keys=("feature", "version")),
            "oov_rate": Gauge("rankray_feature_oov_rate", "share of served values out of vocabulary, by feature",
                              tag_keys=("feature", "version")),
            "score_psi": Gauge("rankray_score_psi", "population stability index of the served scores against "
                               "training's", tag_keys=("version",)),
        }

    def request(self, endpoint: str, code: int, ms: float) -> None:
        with self._lock:
            self.requests[endpoint, code] += 1
            self.latency[endpoint].append(ms)
        if self._ray:
            self._ray["requests"].inc(tags={"endpoint": endpoint, "code": str(code), **self._v})
            self._ray["latency"].observe(ms, tags={"endpoint": endpoint, **self._v})

    def batch(self, requests: int, scores: np.ndarray, oov: dict[str, int]) -> None:
        with self._lock:
            self.batches += 1
            self.batch_requests += requests
            self.rows += len(scores)
            self.score_sum += float(scores.sum())
            for f, n in oov.items():
                self.oov[f] += n
            mean = self.score_sum / max(self.rows, 1)
        if self._ray:
            self._ray["batch"].observe(requests, tags=self._v)
            self._ray["rows"].inc(len(scores), tags=self._v)
            for f, n in oov.items():
                if n:
                    self._ray["oov"].inc(n, tags={"feature": f, **self._v})
            self._ray["mean_score"].set(mean, tags=self._v)

    def drift(self, monitor: Any) -> None:
        """The drift figures to Ray's metrics after each batch (a few numbers per feature)."""
        if not self._ray:
            return
        rep = monitor.report()
        for f, r in rep["features"].items():
            self._ray["psi"].set(r["psi"], tags={"feature": f, **self._v})
            if "oov_rate" in r:
                self._ray["oov_rate"].set(r["oov_rate"], tags={"feature": f, **self._v})
        self._ray["score_psi"].set(rep["score_psi"], tags=self._v)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            lat = {e: {"p50_ms": round(float(np.percentile(d, 50)), 3), "p99_ms": round(float(np.percentile(d, 99)), 3)}
                   for e, d in self.latency.items() if d}
            return {
                "uptime_s": round(time.time() - self.started, 1),
                "requests": [{"endpoint": e, "code": c, "count": n} for (e, c), n in sorted(self.requests.items())],
                "latency_recent": lat,
                "batches": self.batches,
                "mean_batch_requests": round(self.batch_requests / self.batches, 3) if self.batches else None,
                "rows_scored": self.rows,
                "mean_score": self.score_sum / self.rows if self.rows else None,
                "oov": dict(self.oov),
            }
