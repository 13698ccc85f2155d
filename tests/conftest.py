"""Shared fixtures. One local Ray for the whole run (for each pytest worker under `make test`), started by
the first module that needs it, with the dashboard on 127.0.0.1 for Tune's ASHA clean-up; one Serve on it,
a moto S3 server on loopback, one API key in the environment before Ray starts (replicas inherit it, as in
production), and prepared data that several modules share. Modules that must start Ray their own way
(`own_ray`) stop the shared Ray first, and a later module that needs it starts it again."""
from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

import raycluster
from tests.helpers import API_KEY_ENV, free_port

raycluster.use_token_auth()  # as every rankray entry point does, before ray is imported


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The run's order (stable otherwise). In one process: modules marked own_ray last, so the shared Ray
    starts once. In `make test`'s xdist workers (each takes a whole module at a time, in this order): the
    heaviest first (`slow` modules, then those on Ray, then the rest), so the workers finish together."""
    if hasattr(config, "workerinput"):
        items.sort(key=lambda it: (it.get_closest_marker("slow") is None,
                                   "ray_local" not in it.fixturenames and it.get_closest_marker("own_ray") is None))
    else:
        items.sort(key=lambda it: it.get_closest_marker("own_ray") is not None)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3 protocol server (moto, server mode) on loopback; credentials via AWS_* variables."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = pytest.MonkeyPatch()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url,
                 API_KEY_ENV: secrets.token_urlsafe(24)}.items():
        env.setenv(k, v)
    yield url
    server.stop()
    env.undo()


def start_shared_ray() -> None:
    """The run's local Ray (2 logical CPUs, dashboard and token auth on); its processes inherit the AWS_*
    variables of the moto server and the test API key."""
    import ray

    from raycluster.rayinit import job_env

    if ray.is_initialized():
        return
    dash = free_port()
    # the API key reaches the replicas as in production, through the environment the processes inherit
    # (a runtime_env would write it into the runtime-env agent's log)
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    env.update(job_env(None, local=True, dashboard=f"http://127.0.0.1:{dash}"))  # as rankray's own start-up
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dash,
             log_to_driver=False, runtime_env={"env_vars": env})


@pytest.fixture(scope="module")
def ray_local(s3_server: str) -> Iterator[None]:
    start_shared_ray()
    yield


@pytest.fixture(scope="session", autouse=True)
def _ray_down_at_the_end() -> Iterator[None]:
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def serve_url(ray_local: None) -> str:
    """Serve's HTTP proxy on the shared Ray (started once; apps are deployed under their own routes)."""
    from ray import serve

    port = int(os.environ.setdefault("RANKRAY_TEST_SERVE_PORT", str(free_port())))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def own_ray() -> Iterator[None]:
    """For tests that start Ray their own way: the shared one is stopped first."""
    import ray

    ray.shutdown()
    yield
    ray.shutdown()
