"""Resource planning (issue 19, item 1): what a run holds at once, checked against what the cluster has or its
autoscaler's node types can grow to, before any data work; `use_gpu: auto` from GPU node types on a cold
cluster; the autoscaler asked for the nodes, waited for with a deadline, and let go at the end."""
from __future__ import annotations

import json

import pytest
import yaml
from ray.experimental.internal_kv import _internal_kv_get

from training.config import ConfigError, load_config
from training.resources import (NodeType, bundles_for, capacity, check_resources, node_types, nodes_for,
                                resolve_device)

REQUEST_KEY = b"autoscaler_resource_request"  # where Ray's v1 autoscaler reads request_resources
# the shape of cluster.yaml: a CPU head that runs no trial, GPU workers from zero
CLUSTER = {"max_workers": 6, "head_node_type": "head",
           "available_node_types": {"head": {"resources": {"CPU": 0}, "max_workers": 0},
                                    "cpu": {"resources": {"CPU": 8}, "min_workers": 0, "max_workers": 2},
                                    "gpu": {"resources": {"CPU": 8, "GPU": 1}, "min_workers": 0, "max_workers": 4}}}


def _cfg(tmp_path, train: dict, **ray_cfg):
    return load_config(raw={"run": {"name": "plan", "dir": str(tmp_path)}, "data": {"source": "x.parquet"},
                            "features": {"label": "y", "features": [{"name": "u", "type": "categorical"}]},
                            "train": train, "ray": ray_cfg})


def test_node_types_from_a_cluster_config_and_what_the_cluster_can_grow_to(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(CLUSTER))
    types = node_types(_cfg(tmp_path, {}, autoscaler_config=str(path)))
    assert sorted(types, key=lambda t: t.name) == [NodeType("cpu", {"CPU": 8.0}, 2),
                                                   NodeType("gpu", {"CPU": 8.0, "GPU": 1.0}, 4),
                                                   NodeType("head", {"CPU": 0.0}, 1)]
    assert capacity({"CPU": 0.0}, types) == {"CPU": 48.0, "GPU": 4.0}
    assert capacity({"CPU": 2.0}, []) == {"CPU": 2.0}  # no autoscaler: what is up
    path.write_text("available_node_types: 3\n")
    with pytest.raises(ConfigError, match=r"ray.autoscaler_config \(.*\): no available_node_types"):
        node_types(_cfg(tmp_path, {}, autoscaler_config=str(path)))


def test_marketplace_search_on_a_cold_autoscaling_cluster_is_planned_not_refused(tmp_path):
    """configs/marketplace-10m.yaml's resources (2 trials x 2 workers x 4 CPUs + 4 data CPUs) on cluster.yaml's
    node types with nothing up: 20 CPUs and 4 GPUs that the autoscaler can start. Refused only past its
    maximum, with the numbers."""
    types = node_types(_cfg(tmp_path, {}, autoscaler_config=_write(tmp_path, CLUSTER)))
    cfg = _cfg(tmp_path, {"num_workers": 2, "cpus_per_worker": 4, "data_cpus": 4})
    assert bundles_for(cfg, True, trials=2) == [{"CPU": 4.0, "GPU": 1.0}] * 4 + [{"CPU": 4.0}]
    check_resources(cfg, True, trials=2, live={"CPU": 0.0}, nodes=[{"CPU": 0.0}], types=types)
    with pytest.raises(ConfigError, match=r"= 8 GPUs, but the cluster has 0 and can grow to 4") as e:
        check_resources(cfg, True, trials=4, live={"CPU": 0.0}, nodes=[{"CPU": 0.0}], types=types)
    assert "tune.max_concurrent_trials (4)" in str(e.value)
    big = _cfg(tmp_path, {"num_workers": 8, "cpus_per_worker": 8, "data_cpus": 4})
    with pytest.raises(ConfigError, match=r"= 68 CPUs, but the cluster has 0 and can grow to 48 \(the node types"):
        check_resources(big, False, live={"CPU": 0.0}, nodes=[], types=types)
    fat = _cfg(tmp_path, {"cpus_per_worker": 12})
    with pytest.raises(ConfigError, match=r"a Train worker needs 12 CPU .*the biggest: 8 CPU, 1 GPU"):
        check_resources(fat, False, live={"CPU": 0.0}, nodes=[], types=types)
    # no autoscaler: the cluster is what is up
    with pytest.raises(ConfigError, match=r"= 3 CPUs, but the cluster has 2: lower"):
        check_resources(_cfg(tmp_path, {"num_workers": 2}), False, live={"CPU": 2.0}, nodes=[{"CPU": 2.0}], types=[])


def _write(tmp_path, cluster: dict) -> str:
    path = tmp_path / "nodes.json"
    path.write_text(json.dumps(cluster))  # JSON, as `ray start --autoscaling-config` takes it
    return str(path)


@pytest.mark.usefixtures("ray_local")
def test_worker_resources_place_workers_on_a_node_type_and_are_checked_like_gpus(tmp_path):
    """train.worker_resources: custom resources each Train worker also holds (a node type's label-like resource),
    in the bundles asked of the autoscaler and checked against the node types: the sum, and one worker per node."""
    tagged = {**CLUSTER, "available_node_types": {**CLUSTER["available_node_types"],
                                                  "gpu": {"resources": {"CPU": 8, "GPU": 1, "gpu_node": 1},
                                                          "min_workers": 0, "max_workers": 4}}}
    types = node_types(_cfg(tmp_path, {}, autoscaler_config=_write(tmp_path, tagged)))
    cfg = _cfg(tmp_path, {"num_workers": 2, "cpus_per_worker": 4, "data_cpus": 1, "worker_resources": {"gpu_node": 1}})
    assert bundles_for(cfg, False, trials=2) == [{"CPU": 4.0, "gpu_node": 1.0}] * 4 + [{"CPU": 1.0}]
    check_resources(cfg, False, trials=2, live={"CPU": 0.0}, nodes=[{"CPU": 0.0}], types=types)
    with pytest.raises(ConfigError, match=r"train.worker_resources.gpu_node: tune.max_concurrent_trials \(3\) x "
                                          r"train.num_workers = 6 gpu_node, but the cluster has 0 and can grow to 4"):
        check_resources(cfg, False, trials=3, live={"CPU": 0.0}, nodes=[{"CPU": 0.0}], types=types)
    fat = _cfg(tmp_path, {"cpus_per_worker": 9, "worker_resources": {"gpu_node": 1}})
    with pytest.raises(ConfigError, match=r"a Train worker needs 9 CPU, 1 gpu_node \(train.cpus_per_worker, "
                                          r"train.worker_resources\)"):
        check_resources(fat, False, live={"CPU": 0.0}, nodes=[], types=types)
    with pytest.raises(ConfigError, match=r"train.worker_resources.GPU: CPU and GPU have their own keys"):
        _cfg(tmp_path, {"worker_resources": {"GPU": 1}})


def test_use_gpu_auto_sees_gpu_node_types_before_any_gpu_is_up(tmp_path):
    cfg = _cfg(tmp_path, {}, autoscaler_config=_write(tmp_path, CLUSTER))
    assert resolve_device(cfg)[0] is True  # the local Ray has no GPU: the node types do
    cpu_only = {**CLUSTER, "available_node_types": {k: v for k, v in CLUSTER["available_node_types"].items()
                                                    if k != "gpu"}}
    assert resolve_device(_cfg(tmp_path, {}, autoscaler_config=_write(tmp_path, cpu_only)))[0] is False


@pytest.mark.usefixtures("ray_local")
def test_nodes_are_asked_of_the_autoscaler_waited_for_and_let_go(tmp_path):
    cfg = _cfg(tmp_path, {"num_workers": 2, "cpus_per_worker": 4, "data_cpus": 2}, resource_timeout_s=1.5)
    seen, up = [], iter([{"CPU": 2.0}, {"CPU": 2.0}, {"CPU": 6.0}, {"CPU": 10.0}])

    def live() -> dict:  # the cluster as the autoscaler adds nodes
        seen.append(json.loads(_internal_kv_get(REQUEST_KEY) or b"[]"))
        return next(up)

    with nodes_for(cfg, False, live=live, poll_s=0.01):
        with nodes_for(cfg, False, live=live):  # nested (a pipeline's search): no second request
            pass
        assert json.loads(_internal_kv_get(REQUEST_KEY)) == [{"CPU": 4.0}, {"CPU": 4.0}, {"CPU": 2.0}]
    assert seen[-1] == [{"CPU": 4.0}, {"CPU": 4.0}, {"CPU": 2.0}] and len(seen) == 4
    assert json.loads(_internal_kv_get(REQUEST_KEY)) == []  # let go: the nodes can scale down

    with pytest.raises(TimeoutError, match=r"ray.resource_timeout_s.*never came: 8 of 10 CPU"):
        with nodes_for(cfg, False, live=lambda: {"CPU": 2.0}, poll_s=0.05):
            pass
    assert json.loads(_internal_kv_get(REQUEST_KEY)) == []
    # what is up already: nothing asked
    with nodes_for(cfg, False, live=lambda: {"CPU": 16.0}):
        assert json.loads(_internal_kv_get(REQUEST_KEY)) == []
