"""A small client for the rankray HTTP API (stdlib only)."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any


class RankrayError(RuntimeError):
    """A non-2xx answer; `status` is the HTTP status and the message the server's `detail`."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


def _call(url: str, method: str, body: dict[str, Any] | None, api_key: str | None, timeout: float) -> dict[str, Any]:
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body, allow_nan=False).encode()
        headers["Content-Type"] = "application/json"
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - caller-chosen http(s) URL
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        try:
            detail = json.loads(text).get("detail", text)
        except (ValueError, AttributeError):
            detail = text
        raise RankrayError(e.code, str(detail)) from None


def rank(url: str, context: dict[str, Any], candidates: list[dict[str, Any]], top_k: int | None = None,
         api_key: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """POST /rank: {"model_version", "results": [{"index", "id", "score"}, ...]} best first."""
    body: dict[str, Any] = {"context": context, "candidates": candidates}
    if top_k is not None:
        body["top_k"] = top_k
    return _call(f"{url.rstrip('/')}/rank", "POST", body, api_key, timeout)


def predict(url: str, rows: list[dict[str, Any]], api_key: str | None = None, timeout: float = 10.0) -> list[float]:
    """POST /predict: the scores of `rows`, in order."""
    return _call(f"{url.rstrip('/')}/predict", "POST", {"rows": rows}, api_key, timeout)["scores"]


def model_info(url: str, api_key: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """GET /model: version, metrics, features and live counters."""
    return _call(f"{url.rstrip('/')}/model", "GET", None, api_key, timeout)


def healthy(url: str, timeout: float = 2.0) -> bool:
    """True when GET /healthz answers 200."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/healthz", timeout=timeout) as resp:  # noqa: S310
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_healthy(url: str, timeout: float = 120.0) -> None:
    """Poll /healthz until it answers 200; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not healthy(url):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}/healthz did not answer 200 within {timeout:.0f} s")
        time.sleep(0.3)
