"""The deployment files: cluster.yaml (Ray cluster launcher, AWS) and deploy/kuberay/*.yaml.

Checked with Ray's own validation and schemas where Ray ships them, plus the security properties the
files promise. Nothing here starts Ray or talks to a cloud.
"""
import copy
import importlib
import json
import os
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
RAYJOB = ROOT / "deploy" / "kuberay" / "rayjob.yaml"
RAYSERVICE = ROOT / "deploy" / "kuberay" / "rayservice.yaml"
SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"

# EC2 families with NVIDIA GPUs (g: graphics/inference, p: training)
GPU_INSTANCE = re.compile(r"^(g4dn|g5|g5g|g6|g6e|gr6|p3|p3dn|p4d|p4de|p5|p5e|p5en)\.")
RAY_PORTS = {6379, 8000, 8265, 10001}  # GCS, Serve, dashboard, Ray client: never opened to the outside
SHELL_OPERATORS = re.compile(r"[;&|`<>]|\$\(")


def _load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def cluster() -> dict:
    return _load(CLUSTER)


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return _load(RAYJOB)


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return _load(RAYSERVICE)


# ---------------------------------------------------------------- cluster.yaml (ray up)

def test_cluster_config_passes_rays_schema_and_ray_up_validation(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads(SCHEMA.read_text())
    jsonschema.validate(cluster, schema)
    # what `ray up` runs before it contacts AWS: defaults merged, then schema + consistency checks
    validate_config(prepare_config(copy.deepcopy(cluster)))

    # the schema is strict enough to catch a misplaced key (not a vacuous check)
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_worker"]["InstanceType"] = "g5.xlarge"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def _ray_start_commands(commands: list[str]) -> list[str]:
    return [c for c in commands if re.search(r"\bray start\b", c)]


def test_cluster_dashboard_only_on_localhost_of_the_head(cluster):
    head_starts = _ray_start_commands(cluster["head_start_ray_commands"])
    assert len(head_starts) == 1 and "--head" in head_starts[0]
    assert "--dashboard-host=127.0.0.1" in head_starts[0].split()
    everything = json.dumps(cluster)
    assert not re.search(r"dashboard-host[= ]+(?!127\.0\.0\.1)", everything), "dashboard bound elsewhere"
    assert "0.0.0.0" not in everything
    # no inbound rule that reaches Ray's ports (Ray's default group allows SSH and intra-cluster only)
    for rule in cluster["provider"].get("security_group", {}).get("IpPermissions", []):
        lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
        assert lo != -1 and not any(lo <= p <= hi for p in RAY_PORTS), rule
    for node_type in cluster["available_node_types"].values():
        assert "SecurityGroupIds" not in node_type["node_config"]  # a custom group would need review here


def test_cluster_token_auth_on_every_node(cluster):
    starts = _ray_start_commands(cluster["head_start_ray_commands"]) + \
        _ray_start_commands(cluster["worker_start_ray_commands"])
    assert len(starts) == 2
    for cmd in starts:
        # the variable is set for the `ray start` itself, not for an earlier command of the line
        segment = cmd.split(";")[-1]
        assert re.search(r"(^|\s)RAY_AUTH_MODE=token\s+\S*ray start\b", segment), cmd

    # the token file travels to every node: ray up syncs file_mounts to the head, the head to workers
    mounts = {remote: local for remote, local in cluster["file_mounts"].items()
              if remote.endswith("/.ray/auth_token")}
    assert len(mounts) == 1
    (remote, local), = mounts.items()
    assert Path(os.path.expanduser(local)) == Path.home() / ".ray" / "auth_token"
    assert remote in (f"/home/{cluster['auth']['ssh_user']}/.ray/auth_token", "~/.ray/auth_token")
    # readable by its owner only, before Ray starts (setup runs after the file mounts are synced)
    assert any("chmod 600 ~/.ray/auth_token" in c for c in cluster["setup_commands"])


def test_cluster_node_types_cpu_head_and_gpu_workers(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert not GPU_INSTANCE.match(head["node_config"]["InstanceType"]), "the head is a CPU node"
    workers = {name: t for name, t in types.items() if name != cluster["head_node_type"]}
    gpu = [t for t in workers.values() if GPU_INSTANCE.match(t["node_config"]["InstanceType"])]
    assert gpu, "no worker type with a GPU instance"
    for t in types.values():
        assert 0 <= t.get("min_workers", 0) <= t.get("max_workers", cluster["max_workers"])
        assert t.get("max_workers", 0) <= cluster["max_workers"]
    assert sum(t.get("min_workers", 0) for t in types.values()) <= cluster["max_workers"]
    assert any(t["max_workers"] > 0 for t in gpu)
    # one image for all nodes: Ray needs the same Python and Ray versions on every node
    assert len({t["node_config"]["ImageId"] for t in types.values()}) == 1


def test_cluster_installs_this_project_on_every_node(cluster):
    remote_repo = [r for r, local in cluster["file_mounts"].items() if local in (".", "./")]
    assert len(remote_repo) == 1
    repo = remote_repo[0].replace(f"/home/{cluster['auth']['ssh_user']}", "~")
    installs = [c for c in cluster["setup_commands"] if "pip install" in c and " -e " in c]
    assert installs and any(c.split()[-1] in (remote_repo[0], repo) for c in installs), installs
    # the rsync of "." honours .gitignore, which keeps the local virtualenv and run outputs home
    assert ".gitignore" in cluster["rsync_filter"]
    ignored = (ROOT / ".gitignore").read_text().split()
    assert {".venv/", "runs/"} <= set(ignored)
    # the start commands use the interpreter the setup installed into
    venv_bins = {re.search(r"(\S*/bin/)ray start", c).group(1)
                 for c in _ray_start_commands(cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"])}
    assert len(venv_bins) == 1
    venv = venv_bins.pop().removesuffix("bin/")
    assert any(f"{venv}bin/python -m pip install" in c for c in installs)


def test_cluster_s3_access_through_instance_profiles_not_keys(cluster):
    for name, t in cluster["available_node_types"].items():
        if name != cluster["head_node_type"]:  # the head gets ray-autoscaler-v1 from `ray up` when unset
            assert t["node_config"].get("IamInstanceProfile"), f"{name}: workers read and write S3"
    text = CLUSTER.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|AWS_SECRET_ACCESS_KEY", text)


# ---------------------------------------------------------------- deploy/kuberay

def _pod_specs(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"]["template"]["spec"]] + \
        [g["template"]["spec"] for g in cluster_spec["workerGroupSpecs"]]


def _ray_containers(cluster_spec: dict) -> list[dict]:
    # KubeRay's convention: the Ray container is the first of each pod
    return [spec["containers"][0] for spec in _pod_specs(cluster_spec)]


def _env(container_or_env) -> dict[str, dict]:
    env = container_or_env.get("env", []) if isinstance(container_or_env, dict) else container_or_env
    names = [e["name"] for e in env]
    assert len(names) == len(set(names)), f"duplicate env entries: {names}"
    return {e["name"]: e for e in env}


def _assert_token_env(env: dict[str, dict], secret: str, where: str) -> None:
    assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", where
    token = env.get("RAY_AUTH_TOKEN")
    assert token and "value" not in token, f"{where}: the token comes from a Secret, never inline"
    assert token["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "auth_token"}, where


def _assert_cluster_spec(cluster_spec: dict, where: str) -> None:
    assert cluster_spec["rayVersion"] == ray.__version__
    head = cluster_spec["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["image"]
    groups = cluster_spec["workerGroupSpecs"]
    assert groups
    for g in groups:
        assert g["groupName"]
        for k in ("replicas", "minReplicas", "maxReplicas"):
            assert isinstance(g[k], int), f"{where}: {g['groupName']}.{k}"
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and g["maxReplicas"] > 0

    # token auth: on every Ray container, from the Secret the operator is also told about
    auth = cluster_spec["authOptions"]
    assert auth["mode"] == "token"
    for c in _ray_containers(cluster_spec):
        _assert_token_env(_env(c), auth["secretName"], f"{where}: {c['name']}")

    # the dashboard (and Serve) reachable inside the Kubernetes cluster only
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)
    assert "dashboard-host" not in head["rayStartParams"] or head["rayStartParams"]["dashboard-host"] in (
        "0.0.0.0", "127.0.0.1")  # in-pod bind; exposure is decided by the Service above

    # one image everywhere: Ray needs one Ray and one Python version across the cluster
    assert len({c["image"] for c in _ray_containers(cluster_spec)}) == 1


def test_rayjob_required_fields_and_gpu_worker_group(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert rayjob["metadata"]["name"]
    spec = rayjob["spec"]
    _assert_cluster_spec(spec["rayClusterSpec"], "RayJob")
    gpu_groups = [g for g in spec["rayClusterSpec"]["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups and all(g["maxReplicas"] >= 1 for g in gpu_groups)
    assert spec["shutdownAfterJobFinishes"] is True  # the GPU nodes go away with the job


def test_rayjob_entrypoint_runs_the_pipeline_on_the_cluster(rayjob):
    entrypoint = rayjob["spec"]["entrypoint"]
    # --no-wait: the job ends after the smoke request (serving is the RayService's)
    assert entrypoint.split() == ["rankray", "pipeline", "--config", "configs/marketplace-10m.yaml", "--no-wait"]
    # KubeRay runs `ray job submit ... -- <entrypoint>` in a shell of the submitter pod: a shell
    # operator would run the rest of the line there, not on the cluster
    assert not SHELL_OPERATORS.search(entrypoint)
    # the relative config path resolves in the head container's working directory
    assert rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["workingDir"]


def test_rayjob_entrypoint_is_a_real_rankray_command():
    from raycluster.cli import build_parser

    argv = shlex.split(_load(RAYJOB)["spec"]["entrypoint"])
    assert argv[0] == "rankray"
    args = build_parser().parse_args(argv[1:])  # SystemExit on an unknown subcommand or option
    assert args.command == "pipeline"
    assert (ROOT / args.config).is_file(), f"{args.config} is not in the repository"


def test_rayjob_submitter_and_autoscaler_carry_the_token(rayjob):
    spec = rayjob["spec"]
    secret = spec["rayClusterSpec"]["authOptions"]["secretName"]
    submitter = spec["submitterPodTemplate"]["spec"]
    assert submitter["restartPolicy"] == "Never"
    assert "command" not in submitter["containers"][0]  # KubeRay fills in `ray job submit`
    _assert_token_env(_env(submitter["containers"][0]), secret, "submitter")
    if spec["rayClusterSpec"].get("enableInTreeAutoscaling"):
        _assert_token_env(_env(spec["rayClusterSpec"]["autoscalerOptions"]["env"]), secret, "autoscaler")
    images = {c["image"] for c in _ray_containers(spec["rayClusterSpec"])} | {submitter["containers"][0]["image"]}
    assert len(images) == 1


def test_rayservice_required_fields(rayservice):
    assert rayservice["apiVersion"] == "ray.io/v1" and rayservice["kind"] == "RayService"
    assert rayservice["metadata"]["name"]
    _assert_cluster_spec(rayservice["spec"]["rayClusterConfig"], "RayService")
    assert isinstance(rayservice["spec"]["serveConfigV2"], str)  # KubeRay takes it as a YAML string


def test_rayservice_deploys_this_repos_serve_app(rayservice):
    from ray.serve.schema import ServeDeploySchema

    serve_cfg = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_cfg)  # what `serve deploy` / KubeRay submit is checked against
    reference = _load(ROOT / "serving" / "serve_config.yaml")["applications"][0]

    apps = serve_cfg["applications"]
    assert len(apps) == 1
    app = apps[0]
    assert app["import_path"] == reference["import_path"]
    module_name, _, attr = app["import_path"].partition(":")
    module = importlib.import_module(module_name)
    builder = getattr(module, attr)
    assert callable(builder)

    # the args are what the builder accepts (AppArgs forbids unknown keys), with the bundle on S3
    args = module.AppArgs.model_validate(app["args"])
    assert set(app["args"]) <= set(reference["args"]) | {"num_cpus"}
    assert args.bundle.startswith("s3://") and args.bundle.rstrip("/").endswith("/winner")

    # the API key the replicas read is given to every node that can host a replica, from a Secret
    key_env = args.serve.api_key_env
    assert key_env
    for c in _ray_containers(rayservice["spec"]["rayClusterConfig"])[1:]:
        entry = _env(c).get(key_env)
        assert entry and "value" not in entry and entry["valueFrom"]["secretKeyRef"]["name"], c["name"]


@pytest.mark.parametrize("path", [RAYJOB, RAYSERVICE])
def test_kuberay_files_hold_no_credentials(path):
    text = path.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|AWS_SECRET_ACCESS_KEY", text)
    doc = _load(path)
    cluster_spec = doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]
    for c in _ray_containers(cluster_spec):
        for name, e in _env(c).items():
            if re.search(r"TOKEN|KEY|SECRET|PASSWORD", name):
                assert "value" not in e, f"{path.name}: {c['name']}.{name} is inline"
