"""`rankray serve`: start (or join) Ray, run the Ranker app on Serve, wait until healthy, print how to call it."""
from __future__ import annotations

import json
import shlex
import time
from typing import Any

from raycluster.config import Config, ServeConfig
from serving.client import wait_healthy
from training.bundle import load_bundle
from training.features import Preprocessor


class ServeStartError(RuntimeError):
    """The app was deployed but its URL never answered /healthz."""


def example_body(pp: Preprocessor, meta: dict[str, Any]) -> dict[str, Any]:
    """A /rank body built from the bundle's first sample row."""
    row = meta["samples"]["rows"][0] if meta["samples"]["rows"] else {}
    return {"candidates": [{"id": "item-1", **{c: row.get(c) for c in pp.input_columns}}], "top_k": 10}


def curl_line(url: str, body: dict[str, Any], api_key_env: str | None) -> str:
    auth = f' -H "Authorization: Bearer ${api_key_env}"' if api_key_env else ""
    return (f"curl -s -X POST {url}/rank -H 'Content-Type: application/json'{auth} "
            f"-d {shlex.quote(json.dumps(body))}")


def run_server(bundle: str, serve_cfg: ServeConfig | None = None, cfg: Config | None = None,
               host: str | None = None, port: int | None = None, wait: bool = True,
               health_timeout_s: float = 120.0) -> str:
    """Deploy `bundle` as app "rankray" at route "/"; block until Ctrl-C when `wait`. Returns the URL."""
    from ray import serve

    from raycluster.rayinit import ensure_ray
    from serving.app import build_app

    pp, _, meta = load_bundle(bundle)  # fail here, with the file named, before anything starts
    body = example_body(pp, meta)
    if serve_cfg is None:
        serve_cfg = meta["config"].serve  # the serve section the bundle was trained with
    serve_cfg = ServeConfig.model_validate({**serve_cfg.model_dump(), **({"host": host} if host else {}),
                                           **({"port": port} if port else {})})
    ensure_ray(cfg, job_name="rankray-serve")
    serve.start(http_options={"host": serve_cfg.host, "port": serve_cfg.port})
    serve.run(build_app(bundle, serve_cfg), name="rankray", route_prefix="/")
    shown = "127.0.0.1" if serve_cfg.host in ("0.0.0.0", "::") else serve_cfg.host
    url = f"http://{shown}:{serve_cfg.port}"
    try:
        wait_healthy(url, health_timeout_s)
    except TimeoutError as e:
        raise ServeStartError(f"{e}; if Serve was already running on this cluster, it kept its own host and port") \
            from None
    print(f"rankray is serving {bundle} at {url}  (API docs: {url}/docs)")
    print(curl_line(url, body, serve_cfg.api_key_env), flush=True)
    if wait:
        serve_until_interrupted()
    return url


def serve_until_interrupted() -> None:
    """Keep this process (and the local Ray it started) up until Ctrl-C, then remove the app."""
    from ray import serve

    print("serving until Ctrl-C", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        serve.delete("rankray")
        print("stopped", flush=True)
