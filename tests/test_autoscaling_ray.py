"""The cluster path on a real autoscaling Ray: Ray's fake multi-node provider starts and stops worker nodes
(real raylets on this machine) as a cloud provider would start machines. The head has 0 CPUs, every worker
type starts at zero, and one type declares a GPU-shaped custom resource (`gpu_node`) that the Train workers
ask for (train.worker_resources), as GPU workers are placed on a real cluster. `ray job submit` of
configs/marketplace-10m.yaml, sized down with --set only (token auth on): rankray asks the autoscaler for the
run's nodes, the trials run on the gpu_node workers, the pipeline finishes and deploys, and the workers
scale down once the run has let go of them. A run asking for more than the node types' maximum fails before
any data work, naming the numbers.

The cluster's GCS listens on a free port that the provider is told (`provider.gcs_address`): fake workers
otherwise join port 6379 only. The nodes are watched through the dashboard's state API."""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from serving.client import predict
from tests.helpers import free_port, job_submit, ray_head

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GPU_TYPE = {"CPU": 1, "gpu_node": 1}  # a GPU machine's shape, its GPU as a custom resource for placement


def _cluster_config(gcs_port: int) -> dict:
    empty = {k: [] for k in ("head_start_ray_commands", "worker_start_ray_commands", "setup_commands",
                             "head_setup_commands", "worker_setup_commands", "initialization_commands",
                             "cluster_synced_files")}
    return {"cluster_name": "rankray-test", "max_workers": 3, "idle_timeout_minutes": 0.1, "upscaling_speed": 4,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{gcs_port}"},
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
                "cpu": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 1},
                "gpu": {"resources": GPU_TYPE, "node_config": {}, "min_workers": 0, "max_workers": 2}},
            "head_node_type": "ray.head.default", "auth": {}, "file_mounts": {}, **empty}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    where = tmp_path_factory.mktemp("autoscaling")
    port = free_port()
    path = where / "cluster.json"  # JSON, as `ray start --autoscaling-config` takes it
    path.write_text(json.dumps(_cluster_config(port)))
    env = {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_FAKE_CLUSTER": "1",
           "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    with ray_head(num_cpus=0, env=env, port=port, args=[f"--autoscaling-config={path}"]) as h:
        yield {**h, "config": str(path), "dir": where}


def _workers(address: str) -> dict[str, int]:
    """Alive worker nodes by type (gpu: declares gpu_node), from the dashboard's state API."""
    from ray.util.state import list_nodes

    out = {"cpu": 0, "gpu": 0}
    for n in list_nodes(address=address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False):
        if not n.is_head_node:
            out["gpu" if "gpu_node" in n.resources_total else "cpu"] += 1
    return out


class Watch:
    """The most worker nodes of each type seen alive, sampled every second in the background."""

    def __init__(self, address: str):
        self.address, self.peak, self._stop = address, {"cpu": 0, "gpu": 0}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            for k, v in _workers(self.address).items():
                self.peak[k] = max(self.peak[k], v)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peak


def _submit(cluster, extra: list[str]) -> subprocess.CompletedProcess:
    d = cluster["dir"]
    sets = [f"run.dir={d}/runs", f"data.source={d}/data", "data.generate.rows=20000", "data.generate.shards=2",
            "train.num_workers=1", "train.cpus_per_worker=1", "train.data_cpus=1", "train.batch_size=1024",
            "train.epochs=1", "train.evals_per_epoch=1", "train.worker_resources={gpu_node: 1}",
            "model.embedding_dim=8", "model.mlp=[32]", "tune.num_samples=2", "tune.max_concurrent_trials=2",
            "serve.num_replicas=1", "pipeline.min_test_auc=0.5", f"ray.autoscaler_config={cluster['config']}",
            "ray.resource_timeout_s=120", *extra]
    # rankray as installed on the nodes (an image's package), no --working-dir: the fake nodes share this
    # machine's session directory, and one node's runtime-env clean-up deletes the job's unpacked working dir
    # under the others (the driver's cwd vanishes); real nodes each have their own disk
    cmd = [cluster["bin"], "job", "submit", "--address", cluster["address"],
           "--runtime-env-json", json.dumps({"env_vars": {"RAY_AUTH_MODE": "token"}}), "--",
           "rankray", "pipeline", "--config", str(ROOT / "configs" / "marketplace-10m.yaml"), "--no-wait"]
    cmd += [x for s in sets for x in ("--set", s)]
    return job_submit(cmd, cluster["env"], ROOT)


def _wait_workers(address: str, at_most: int, timeout: float) -> dict[str, int]:
    deadline = time.time() + timeout
    while sum((now := _workers(address)).values()) > at_most and time.time() < deadline:
        time.sleep(1)
    return now


def test_more_than_the_node_types_can_give_fails_before_any_data_work(cluster):
    watch = Watch(cluster["address"])
    out = _submit(cluster, ["tune.max_concurrent_trials=3", "run.name=too-big"])
    peak = watch.stop()
    log = out.stdout + out.stderr
    assert out.returncode != 0
    # 3 concurrent one-worker trials hold 3 gpu_node; the gpu type runs at most 2 of them
    assert "train.worker_resources.gpu_node" in log and "= 3 gpu_node" in log and "can grow to 2" in log, log[-3000:]
    assert "profile, split, fit and encode" not in log
    assert not (cluster["dir"] / "data").exists()
    assert peak == {"cpu": 0, "gpu": 0}  # nothing was asked of the autoscaler


def test_job_scales_up_from_zero_trains_on_gpu_nodes_deploys_and_scales_down(cluster):
    from ray.job_submission import JobStatus, JobSubmissionClient

    assert _workers(cluster["address"]) == {"cpu": 0, "gpu": 0}
    port = free_port()
    watch = Watch(cluster["address"])
    out = _submit(cluster, [f"serve.port={port}"])
    peak = watch.stop()
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]
    # two concurrent trials, each holding a gpu_node: the autoscaler started both gpu workers from zero
    assert peak["gpu"] == 2, (peak, log[-3000:])
    for banner in ("profile, split, fit and encode", "tune (Ray Tune", "gate", "deploy on Ray Serve", "smoke request"):
        assert banner in log
    jobs = JobSubmissionClient(cluster["address"]).list_jobs()
    assert JobStatus.SUCCEEDED in [j.status for j in jobs]
    # the deployed winner answers real HTTP with the bundle's own scores
    bundle = cluster["dir"] / "runs" / "marketplace-10m" / "winner"
    samples = json.loads((bundle / "samples.json").read_text())
    assert predict(f"http://127.0.0.1:{port}", samples["rows"][:3]) == pytest.approx(samples["scores"][:3], abs=1e-5)
    # the run let go of its nodes: only the Serve replica's node stays up
    left = _wait_workers(cluster["address"], 1, 90)
    assert sum(left.values()) <= 1, left
    # without the app, the cluster goes back to its head alone
    shut = subprocess.run([cluster["bin"][:-3] + "serve", "shutdown", "-a", cluster["address"], "-y"],
                          env=cluster["env"], capture_output=True, text=True, timeout=120)
    assert shut.returncode == 0, shut.stderr[-2000:]
    assert _wait_workers(cluster["address"], 0, 90) == {"cpu": 0, "gpu": 0}
