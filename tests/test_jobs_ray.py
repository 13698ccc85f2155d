"""`ray job submit` of the whole pipeline to a `ray start --head` cluster on loopback, token auth on,
exactly as the README shows, reading its data from and writing its run directory to a moto S3
server; a second submit of the same run skips the finished stages; a third with a higher bar is
refused by the gate."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serving.client import predict
from tests.helpers import free_port, job_submit, ray_head

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def head(s3_server):
    """A real head node started with the CLI (not this process's Ray), dashboard on 127.0.0.1; its
    processes inherit the AWS_* variables of the moto server."""
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="jobs")
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    with ray_head(env={"PATH": path}) as h:
        yield h


def _submit(head, run_dir: str, serve_port: int, data_dir: str, *extra: str) -> subprocess.CompletedProcess:
    sets = [f"run.dir={run_dir}", f"data.source={data_dir}", "data.generate.rows=40000", "data.generate.shards=2",
            "train.epochs=2", "train.evals_per_epoch=1", "train.cpus_per_worker=1", "train.data_cpus=0.5",
            "tune.num_samples=2", f"serve.port={serve_port}", "pipeline.min_test_auc=0.5", *extra]
    cmd = [head["bin"], "job", "submit", "--address", head["address"], "--working-dir", str(ROOT),
           "--runtime-env-json", json.dumps({"env_vars": {"RAY_AUTH_MODE": "token"}}), "--",
           "rankray", "pipeline", "--config", "configs/demo.yaml", "--no-wait"]
    cmd += [x for s in sets for x in ("--set", s)]
    return job_submit(cmd, head["env"], ROOT)


def _s3_text(key: str) -> str:
    import boto3

    return boto3.client("s3").get_object(Bucket="jobs", Key=key)["Body"].read().decode()


def test_job_submit_runs_the_pipeline_on_s3_and_a_resubmit_skips_finished_stages(head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    run_dir, data_dir, port = "s3://jobs/runs", "s3://jobs/data/demo", free_port()
    t0 = time.time()
    out = _submit(head, run_dir, port, data_dir)
    first = time.time() - t0
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout
    for banner in ("profile, split, fit and encode", "tune (Ray Tune", "gate", "deploy on Ray Serve", "smoke request"):
        assert banner in log
    assert "Ray dashboard: http://127.0.0.1:" in log
    # the gate line shows the winner against logreg and lightgbm trained on the same split
    gate_line = next(ln for ln in log.splitlines() if ln.strip().startswith("winner test AUC"))
    assert "logreg" in gate_line and "lightgbm" in gate_line and "lightgbm test AUC" in log, gate_line
    assert f"POST http://127.0.0.1:{port}/rank" in log and "curl -s -X POST" in log
    # the dashboard's jobs API (token auth) shows the job SUCCEEDED
    jobs = JobSubmissionClient(head["address"]).list_jobs()
    assert [j.status for j in jobs] == [JobStatus.SUCCEEDED]
    # the run directory is on S3: stage records, the winner bundle with its report
    stages = json.loads(_s3_text("runs/demo/pipeline/stages.json"))
    bundle = stages["tune (Ray Tune + Optuna + ASHA)"]["outputs"]["bundle"]
    assert bundle == "s3://jobs/runs/demo/winner"
    manifest = json.loads(_s3_text("runs/demo/winner/manifest.json"))
    assert {"report.html", "weights.safetensors"} <= set(manifest["files"])
    # the Serve app outlives the job on the cluster: it answers real HTTP with the bundle's own scores
    samples = json.loads(_s3_text("runs/demo/winner/samples.json"))
    scores = predict(f"http://127.0.0.1:{port}", samples["rows"][:3])
    assert scores == pytest.approx(samples["scores"][:3], abs=1e-5)
    # the same command again with a bar the winner cannot reach: the finished stages (data, search, test,
    # baselines: none depends on the bar) are skipped, then the gate refuses the winner, says why, and the
    # job fails
    t0 = time.time()
    refused = _submit(head, run_dir, port, data_dir, "pipeline.min_test_auc=0.999")
    assert refused.returncode != 0
    assert "below pipeline.min_test_auc 0.9990: not deployed" in refused.stdout + refused.stderr
    assert refused.stdout.count("skipped") >= 4, refused.stdout[-3000:]
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
