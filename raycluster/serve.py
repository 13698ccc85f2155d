"""`rankray serve` and the pipeline's deploy stage: start (or join) Ray, run the Ranker app (serving/app.py) on
Serve, wait until healthy, print how to call it."""
from __future__ import annotations

import json
import shlex
import socket
import time
from typing import Any

from training.config import Config, ServeConfig
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
               health_timeout_s: float = 120.0, loaded: tuple[Preprocessor, dict[str, Any]] | None = None) -> str:
    """Deploy `bundle` as app "rankray" at route "/"; block until Ctrl-C when `wait`. Returns the URL.
    `loaded`: the bundle's (preprocessor, metadata) when the caller has loaded it already."""
    from ray import serve

    from raycluster.rayinit import ensure_ray, free_port
    from serving.app import build_app

    if loaded is None:
        pp, _, meta = load_bundle(bundle)  # fail here, with the file named, before anything starts
    else:
        pp, meta = loaded
    body = example_body(pp, meta)
    if serve_cfg is None:
        serve_cfg = meta["config"].serve  # the serve section the bundle was trained with
    serve_cfg = ServeConfig.model_validate({**serve_cfg.model_dump(), **({"host": host} if host else {}),
                                           **({"port": port} if port else {})})
    ensure_ray(cfg, job_name="rankray-serve", serve=serve_cfg)
    direct = serve_cfg.ingress == "direct"
    # direct ingress: the replica itself listens on serve.port; Serve's proxy (always started) takes another
    serve.start(proxy_location=serve_cfg.proxy_location,
                http_options={"host": serve_cfg.host, "port": free_port(serve_cfg.host) if direct else serve_cfg.port})
    if direct:
        replacing = "rankray" in serve.status().applications
        if replacing:  # the port belongs to the running replica: replace the app, no rolling update
            serve.delete("rankray")
        _wait_port_free(serve_cfg.host, serve_cfg.port, 60.0 if replacing else 0.0)
    serve.run(build_app(bundle, serve_cfg), name="rankray", route_prefix="/")
    shown = "127.0.0.1" if serve_cfg.host in ("0.0.0.0", "::") else serve_cfg.host
    url = f"http://{shown}:{serve_cfg.port}"
    try:
        # a direct replica listens by the time serve.run returns: not answering means Serve ignored the mode
        wait_healthy(url, 20.0 if direct else health_timeout_s)
    except TimeoutError as e:
        hint = ("direct ingress needs a Serve started by rankray with it (its processes read it when they start): "
                "run `serve shutdown` first, or set serve.ingress: proxy") if direct else \
            "if Serve was already running on this cluster, it kept its own host and port"
        raise ServeStartError(f"{e}; {hint}") from None
    print(f"rankray is serving {bundle} at {url}  (API docs: {url}/docs)")
    print(curl_line(url, body, serve_cfg.api_key_env), flush=True)
    if wait:
        serve_until_interrupted()
    return url


def _wait_port_free(host: str, port: int, timeout: float) -> None:
    """The direct replica binds serve.port itself, and Serve gives up on a port it failed to bind: make sure
    it is free first (a replaced replica may hold it a moment after serve.delete returns)."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
                return
            except OSError as e:
                if time.monotonic() > deadline:
                    raise ServeStartError(f"serve.port {port} on {host} is in use ({e.strerror}): choose another "
                                          "serve.port (--port)") from None
        time.sleep(0.2)


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
