"""A small client for the rankray HTTP API (stdlib only)."""
from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from typing import Any


class RankrayError(RuntimeError):
    """A non-2xx answer; `status` is the HTTP status and the message the server's `detail`."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


def _request(url: str, method: str, body: bytes | None, headers: dict[str, str], timeout: float) -> tuple[int, bytes]:
    """One HTTP exchange on its own connection, closed by this side: the server's port keeps no TIME_WAIT
    entry (urllib asks the server to close, and a direct-ingress replica restarted on that port then waits
    the kernel's ~60 s before it can bind it)."""
    u = urllib.parse.urlsplit(url)
    conn = (http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection)(
        u.hostname or "127.0.0.1", u.port, timeout=timeout)
    try:
        conn.request(method, (u.path or "/") + (f"?{u.query}" if u.query else ""), body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _call(url: str, method: str, body: dict[str, Any] | None, api_key: str | None, timeout: float) -> dict[str, Any]:
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body, allow_nan=False).encode()
        headers["Content-Type"] = "application/json"
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    status, raw = _request(url, method, data, headers, timeout)
    if status >= 300:
        text = raw.decode(errors="replace")
        try:
            detail = json.loads(text).get("detail", text)
        except (ValueError, AttributeError):
            detail = text
        raise RankrayError(status, str(detail))
    return json.loads(raw)


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
        return _request(f"{url.rstrip('/')}/healthz", "GET", None, {}, timeout)[0] == 200
    except (OSError, http.client.HTTPException):
        return False


def wait_healthy(url: str, timeout: float = 120.0) -> None:
    """Poll /healthz until it answers 200; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not healthy(url):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}/healthz did not answer 200 within {timeout:.0f} s")
        time.sleep(0.3)
