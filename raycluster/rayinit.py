"""Connect to the cluster named by RAY_ADDRESS / ray.address, or start a local Ray on the fly.

The local Ray keeps Ray 2.60's token authentication on, and binds its dashboard to 127.0.0.1
unless the config says otherwise. CLI tools that talk to it need RAY_AUTH_MODE=token: every rankray
entry point sets it (`raycluster.use_token_auth`) before Ray is imported, for itself and its children.
"""
from __future__ import annotations

import logging
import os
import socket

import ray

from training import console
from training.config import Config, ServeConfig
from training.resources import dashboard_url

log = logging.getLogger("rankray")


def serve_env(serve: ServeConfig | None) -> dict[str, str]:
    """Environment for the Serve processes this job starts. Direct ingress (serve.ingress) turns on Serve's
    throughput-optimized mode with direct ingress and gives the replica exactly serve.port (Serve reads these
    when its controller and replicas start, so they travel with the job, not with the deployment)."""
    if serve is None or serve.ingress != "direct":
        return {}
    return {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(serve.port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(serve.port + 1),  # exclusive
            "RAY_SERVE_PORT_QUARANTINE_S": "0",  # a restarted replica takes the port back at once
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}  # no external load balancer to wait for


def job_env(serve: ServeConfig | None, *, local: bool, dashboard: str | None = None) -> dict[str, str]:
    """The environment rankray gives its Ray job's processes; what the environment (or `ray job submit
    --runtime-env`) already sets wins, and never conflicts. `local`: a one-node Ray rankray starts itself,
    with its dashboard at `dashboard` (http://host:port) when it has one."""
    # Ray Train's controller polls its workers this often (default 2 s): a worker's report waits for the
    # poll, and every run (every Tune trial) ends up to 2 s after its last step
    env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", **serve_env(serve)}
    if local:
        # one node that nobody drains: Ray Train's preemption watcher (an actor per worker group, polling
        # the node's drain state) would cost a process start per run and never see a preemption
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
        if dashboard:
            # Ray's own helpers inside this cluster (e.g. Ray Train's placement-group cleaner, which frees
            # the workers of a stopped Tune trial) find the dashboard through this, not through the
            # machine-wide "current cluster" file that only `ray start` writes (and may be stale)
            env["RAY_API_SERVER_ADDRESS"] = dashboard
    return {k: v for k, v in env.items() if k not in os.environ}


def ensure_ray(cfg: Config | None = None, *, job_name: str | None = None, serve: ServeConfig | None = None) -> str:
    """Start or join Ray once per process; returns the dashboard URL (or '' without one). `serve` (default:
    the config's serve section) sets the environment of the Serve processes this job may start."""
    if ray.is_initialized():
        console.quiet_ray()
        return dashboard_url()
    rc = cfg.ray if cfg else None
    address = (rc.address if rc else None) or os.environ.get("RAY_ADDRESS")
    # rankray's own lines and progress bars say what happens; Ray's INFO lines and the workers' output
    # (in Ray's log files either way, so on the dashboard) come to the console with --verbose
    loud = console.verbose()
    kwargs: dict = {"log_to_driver": loud, "logging_level": logging.INFO if loud else logging.WARNING,
                    "namespace": "rankray"}
    if job_name:
        kwargs["job_config"] = ray.job_config.JobConfig(metadata={"job_name": job_name})
    serve = serve or (cfg.serve if cfg else None)
    if address:
        ray.init(address=address, runtime_env={"env_vars": job_env(serve, local=False)}, **kwargs)
    else:
        dashboard = rc.include_dashboard if rc else False
        host = rc.dashboard_host if rc else "127.0.0.1"
        port = _port_or_free(rc.dashboard_port if rc else 8265)
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        env = job_env(serve, local=True, dashboard=f"http://{shown}:{port}" if dashboard else None)
        # "local": always a new local Ray, never a stale or unrelated `ray start` cluster on the machine
        ray.init(address="local", num_cpus=rc.num_cpus if rc else None, include_dashboard=dashboard,
                 dashboard_host=host, dashboard_port=port, runtime_env={"env_vars": env}, **kwargs)
    console.quiet_ray()
    return dashboard_url()


def _port_or_free(port: int) -> int:
    """`port` if nothing listens on it, else a free one (so the URL given to the cluster is right)."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return port
        except OSError:
            return free_port()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
