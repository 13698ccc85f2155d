"""`ray job submit` of the whole pipeline to a `ray start --head` cluster on loopback, token auth on,
exactly as the README shows; a second submit of the same run skips the finished stages."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serving.client import predict
from tests.conftest import ray_head

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    """A real head node started with the CLI (not this process's Ray), dashboard on 127.0.0.1."""
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    with ray_head(env={"PATH": path}) as h:
        yield h


def _submit(head, run_dir: Path, serve_port: int, data_dir: Path) -> subprocess.CompletedProcess:
    sets = [f"run.dir={run_dir}", f"data.source={data_dir}", "data.generate.rows=40000", "data.generate.shards=2",
            "train.epochs=2", "train.evals_per_epoch=1", "train.cpus_per_worker=1", "train.data_cpus=0.5",
            "tune.num_samples=2", f"serve.port={serve_port}", "pipeline.min_test_auc=0.5"]
    cmd = [head["bin"], "job", "submit", "--address", head["address"], "--working-dir", str(ROOT),
           "--runtime-env-json", json.dumps({"env_vars": {"RAY_AUTH_MODE": "token"}}), "--",
           "rankray", "pipeline", "--config", "configs/demo.yaml", "--no-wait"]
    cmd += [x for s in sets for x in ("--set", s)]
    return subprocess.run(cmd, env=head["env"], capture_output=True, text=True, timeout=900, cwd=ROOT)


def test_job_submit_runs_the_pipeline_and_a_resubmit_skips_finished_stages(head, tmp_path):
    run_dir, data_dir, port = tmp_path / "runs", tmp_path / "data", _free_port()
    t0 = time.time()
    out = _submit(head, run_dir, port, data_dir)
    first = time.time() - t0
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout
    assert "succeeded" in log
    for banner in ("profile, split, fit and encode", "tune (Ray Tune", "gate", "deploy on Ray Serve", "smoke request"):
        assert banner in log
    assert "Ray dashboard: http://127.0.0.1:" in log
    assert f"POST http://127.0.0.1:{port}/rank" in log and "curl -s -X POST" in log
    stages = json.loads((run_dir / "demo" / "pipeline" / "stages.json").read_text())
    bundle = stages["tune (Ray Tune + Optuna + ASHA over Ray Train)"]["outputs"]["bundle"]
    assert (Path(bundle) / "manifest.json").is_file() and (Path(bundle) / "report.html").is_file()
    # the Serve app outlives the job on the cluster: it answers real HTTP
    scores = predict(f"http://127.0.0.1:{port}", [json.loads((Path(bundle) / "samples.json").read_text())["rows"][0]])
    assert len(scores) == 1 and 0 < scores[0] < 1
    # the same command again: finished stages are skipped, the endpoint is redeployed
    t0 = time.time()
    again = _submit(head, run_dir, port, data_dir)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("skipped") >= 4
    assert time.time() - t0 < first


def test_jobs_api_refuses_a_client_without_the_token(head):
    env = {k: v for k, v in head["env"].items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    home = Path(env.get("HOME", "~")).expanduser()
    assert (home / ".ray" / "auth_token").is_file()
    # without token mode the CLI sends no token: the dashboard's jobs API refuses it
    out = subprocess.run([head["bin"], "job", "list", "--address", head["address"]], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and ("401" in out.stdout + out.stderr or "nauthorized" in out.stdout + out.stderr)
    ok = subprocess.run([head["bin"], "job", "list", "--address", head["address"]], env=head["env"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
