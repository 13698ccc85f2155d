"""Connect to the cluster named by RAY_ADDRESS / ray.address, or start a local Ray on the fly.

The local Ray keeps Ray 2.60's token authentication on, and binds its dashboard to 127.0.0.1
unless the config says otherwise. CLI tools that talk to it need RAY_AUTH_MODE=token, which is
set here for child processes too.
"""
from __future__ import annotations

import logging
import os

import raycluster  # noqa: F401 - sets RAY_AUTH_MODE before ray is imported

import ray

from raycluster.config import Config

log = logging.getLogger("rankray")


def ensure_ray(cfg: Config | None = None, *, job_name: str | None = None) -> str:
    """Start or join Ray once per process; returns the dashboard URL (or '' without one)."""
    if ray.is_initialized():
        return dashboard_url()
    rc = cfg.ray if cfg else None
    address = (rc.address if rc else None) or os.environ.get("RAY_ADDRESS")
    # The driver's own log lines are enough; Ray's progress bars stay on for Data and Tune.
    kwargs: dict = {"log_to_driver": True, "namespace": "rankray"}
    if job_name:
        kwargs["job_config"] = ray.job_config.JobConfig(metadata={"job_name": job_name})
    if address:
        ray.init(address=address, **kwargs)
    else:
        # "local": always a new local Ray, never a stale or unrelated `ray start` cluster on the machine
        ray.init(address="local", num_cpus=rc.num_cpus if rc else None,
                 include_dashboard=rc.include_dashboard if rc else False,
                 dashboard_host=rc.dashboard_host if rc else "127.0.0.1",
                 dashboard_port=rc.dashboard_port if rc else 8265, **kwargs)
    return dashboard_url()


def dashboard_url() -> str:
    try:
        url = ray.get_runtime_context().worker.node.address_info.get("webui_url") or ""
    except AttributeError:
        url = ""
    return f"http://{url}" if url and not url.startswith("http") else url
