"""Ray Tune + Optuna + ASHA on a real local Ray: search, early stop, winner bundle, kill-and-resume, and
a bad search space refused before any trial runs. One-worker trials run the loop in the trial's process;
several-worker trials fit a TorchTrainer each. The shared Ray runs the dashboard (127.0.0.1): Ray Train's
clean-up of ASHA-stopped trials asks its state API."""
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file

from training.config import ConfigError, load_config
from training import synth
from training.bundle import load_bundle
from tune.search import run_search
from tune.space import parse_space

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

SPACE = {"train.lr": {"loguniform": [0.00001, 0.02]}, "model.embedding_dim": {"int": [4, 12]},
         "model.mlp": {"choice": [[64, 32], [16]]}}


@pytest.fixture(scope="module")
def gen_dir(tmp_path_factory, ray_local):
    out = str(tmp_path_factory.mktemp("gen") / "mk")
    synth.generate(60_000, out, seed=2, shards=2)
    return out


def _raw(gen_dir, tmp_path, name="s", **tune):
    raw = load_config("configs/demo.yaml").model_dump(mode="json")
    raw["run"] = {"name": name, "dir": str(tmp_path / "runs")}
    raw["data"].update(source=gen_dir, generate=None)
    raw["train"].update({"epochs": 3, "cpus_per_worker": 1, "data_cpus": 0.5, "evals_per_epoch": 1,
                         "patience": 3, "log_every": 1000})
    # blend: never: these tests follow the search's own trials (the winner is the best of them); the
    # ensemble of trials is test_gbdt_ray's
    raw["tune"] = {"num_samples": 4, "max_concurrent_trials": 1, "grace_period": 1, "reduction_factor": 2,
                   "seed": 0, "export_path": str(tmp_path / "winner"), "search_space": SPACE, "blend": "never",
                   **tune}
    return raw


def _terminated(exp_dir: Path) -> list[str]:
    """Trials Tune's own saved experiment state marks finished."""
    states = sorted(exp_dir.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    try:
        data = json.loads(states[-1].read_text())["trial_data"] if states else []
    except (ValueError, KeyError):  # being rewritten
        return []
    trials = [json.loads(t[0]) for t in data]
    return [t["trial_id"] for t in trials if t.get("status") == "TERMINATED"]


def _result_lines(exp_dir: Path) -> dict[str, list[dict]]:
    """Every trial's reported results, read from Tune's own files."""
    out = {}
    for f in exp_dir.glob("*/result.json"):
        lines = []
        for x in f.read_text().splitlines():
            try:
                lines.append(json.loads(x))
            except ValueError:  # being written
                pass
        if lines:
            out[lines[0]["trial_id"]] = lines
    return out


# tried first, in this order: the second learns almost nothing by its epoch-1 rung, where the only
# earlier result is the first's, so ASHA must stop it whatever TPE proposes after them
START = [{"train.lr": 0.01, "model.embedding_dim": 8, "model.mlp": [64, 32]},
         {"train.lr": 0.00001, "model.embedding_dim": 4, "model.mlp": [16]}]


def test_search_stops_weak_trials_and_exports_the_best_valid_trial(gen_dir, tmp_path):
    cfg = load_config(raw=_raw(gen_dir, tmp_path, start_points=START))
    res = run_search(cfg)
    table = res.table
    assert len(table) == 4 and not any(r["error"] for r in table)
    assert any(r["stopped_by"] == "asha" for r in table), table  # ASHA ended at least one trial early
    stopped = [r for r in table if r["stopped_by"] == "asha"]
    made = {p.name.split("_")[2]: int(p.name.split("_")[3])  # Tune's trial dirs: _trial_<id>_<n>_<params>_<time>
            for p in (tmp_path / "runs" / "s" / "tune" / "search").glob("_trial_*")}
    tried = sorted(table, key=lambda r: made[r["trial"]])
    assert [{k: r[k] for k in SPACE} for r in tried[:2]] == START
    assert tried[1]["stopped_by"] == "asha" and tried[1]["epochs_run"] == 1
    assert all(r["epochs_run"] < cfg.train.epochs for r in stopped)
    best = max(table, key=lambda r: r["best_valid_auc"])
    assert res.winner["trial_id"] == best["trial"]
    # the bundle holds the winner's best weights, scored on test once; the trials never saw test
    pp, model, meta = load_bundle(res.bundle)
    assert meta["info"]["trial_id"] == best["trial"]
    assert meta["info"]["params"] == {k: best[k] for k in SPACE}
    assert meta["config"].train.lr == pytest.approx(best["train.lr"])
    assert meta["config"].model.embedding_dim == best["model.embedding_dim"]
    assert meta["metrics"]["best_valid_auc"] == pytest.approx(best["best_valid_auc"], abs=1e-9)
    assert meta["metrics"]["test_passes"] == 1 and 0.5 < meta["metrics"]["test_auc"] < 1
    assert meta["info"]["test_metrics"]["test_auc"] == meta["metrics"]["test_auc"]
    assert "test_auc" not in table[0]
    assert not [k for ls in _result_lines(tmp_path / "runs" / "s" / "tune" / "search").values()
                for x in ls for k in x if k.startswith("test_")]
    # results table saved as CSV and HTML (with charts)
    csv_text = Path(res.results_csv).read_text()
    assert csv_text.splitlines()[0].startswith("trial,train.lr,model.embedding_dim,model.mlp,best_valid_auc")
    assert len(csv_text.strip().splitlines()) == 5
    html = Path(res.results_html).read_text()
    assert "<svg" in html and best["trial"] in html
    # the fixed cost of every trial was measured (Tune's trial start -> first training step)
    assert all(r["startup_s"] is not None and r["startup_s"] > 0 for r in table)
    # one worker per trial: the loop ran in the trial's process, its checkpoints are Tune's
    assert list((tmp_path / "runs" / "s" / "tune" / "search").glob("_trial_*/checkpoint_*"))
    assert not (tmp_path / "runs" / "s" / "tune" / "search-trials").exists()


def test_several_worker_trials_fit_a_torch_trainer_each(gen_dir, tmp_path):
    raw = _raw(gen_dir, tmp_path, name="ddp", num_samples=2, start_points=START)
    raw["train"].update({"num_workers": 2, "cpus_per_worker": 0.5, "epochs": 2})
    res = run_search(load_config(raw=raw))
    by_id = {r["trial"]: r for r in res.table}
    assert len(by_id) == 2 and not any(r["error"] for r in res.table)
    good, weak = sorted(by_id.values(), key=lambda r: r["train.lr"], reverse=True)
    assert weak["stopped_by"] == "asha" and weak["epochs_run"] == 1  # ASHA stops a Train run too
    assert good["epochs_run"] == 2 and res.winner["trial_id"] == good["trial"]
    # each trial was a Train run of its own (its checkpoints under the search's trials directory), and
    # the winner's bundle holds that run's best weights
    runs = tmp_path / "runs" / "ddp" / "tune" / "search-trials"
    assert {p.name for p in runs.iterdir() if any(c.is_dir() for c in p.glob("checkpoint_*"))} == set(by_id)
    _, model, meta = load_bundle(res.bundle)
    assert meta["info"]["trial_id"] == good["trial"]
    last = max(p for p in (runs / good["trial"]).glob("checkpoint_*") if p.is_dir())
    best = load_file(str(last / "best.safetensors"))
    assert best.keys() == model.state_dict().keys()
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())


def test_killed_search_resumes_without_rerunning_finished_trials(gen_dir, tmp_path):
    raw = _raw(gen_dir, tmp_path, name="kill", num_samples=3)
    cfg_path = tmp_path / "search.yaml"
    cfg_path.write_text(json.dumps(raw))  # JSON is YAML
    exp = tmp_path / "runs" / "kill" / "tune" / "search"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "raycluster", "tune", "--config", str(cfg_path)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            done = _terminated(exp)
            if done:
                break
            time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        assert done, "no trial finished in time"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver dies: its trials die with it
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    before = _result_lines(exp)
    first = done[0]
    res = run_search(load_config(cfg_path))  # the same command again: restores
    after = _result_lines(exp)
    assert len(res.table) == 3 and all(r["error"] == "" for r in res.table)
    assert all(lines[-1].get("final") or lines[-1]["epoch"] < 3 for lines in after.values())
    assert after[first] == before[first]  # the finished trial was not run again
    assert res.winner["trial_id"] in after


def test_killed_one_worker_trial_is_retried_from_its_checkpoint(gen_dir, tmp_path):
    """A one-worker trial runs in Tune's trial process: killed, Tune retries it (train.max_failures) and
    it resumes from its latest checkpoint."""
    raw = _raw(gen_dir, tmp_path, name="retry", num_samples=1)
    raw["train"].update({"epochs": 5, "batch_size": 128, "max_failures": 1, "patience": 100,  # ~2 s an epoch
                         "evals_per_epoch": 2})
    exp = tmp_path / "runs" / "retry" / "tune" / "search"
    killed = []

    def kill_after_two_epochs():
        """Once the epoch-2 results are out, epoch 1's checkpoint is surely registered with Tune."""
        deadline = time.time() + 180
        while time.time() < deadline:
            lines = [x for ls in _result_lines(exp).values() for x in ls]
            if any(x["epoch"] >= 2 for x in lines):  # Tune's own results name the trial's process
                os.kill(lines[-1]["pid"], signal.SIGKILL)
                killed.append(lines[-1]["pid"])
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_two_epochs)
    killer.start()
    res = run_search(load_config(raw=raw))
    killer.join()
    assert len(killed) == 1
    (lines,) = _result_lines(exp).values()
    final = lines[-1]
    assert final["final"] and final["epochs_run"] == 5 and res.table[0]["error"] == ""
    assert final["pid"] != killed[0]
    starts = json.loads(final["starts"])
    assert len(starts) == 2 and starts[0] == 0 and starts[1] >= 1, starts  # resumed, not started over
    assert final["resumed_from"].startswith("checkpoint_")
    # every evaluation was reported (ASHA's rungs inside an epoch); epoch ends carry the checkpoints
    mid = [x for x in lines if not float(x["epoch"]).is_integer()]
    assert {math.floor(x["epoch"]) for x in mid} == {0, 1, 2, 3, 4} and all(x["checkpoint_dir_name"] is None for x in mid)
    assert all(x["checkpoint_dir_name"] for x in lines if float(x["epoch"]).is_integer())


def test_bad_search_space_fails_before_any_trial(gen_dir, tmp_path):
    cases = {
        "train.nope": {"uniform": [0, 1]},  # not a config key
        "data.batch_size": {"int": [1, 4]},  # data is prepared once per search
        "train.num_workers": {"int": [1, 2]},  # trial resources are fixed
        "train.lr": {"loguniform": [0, 0.1]},  # log of 0
        "model.dropout": {"uniform": [0.5, 0.1]},  # low above high
        "model.name": {"choice": ["dcnv2", "transformer"]},  # not a model
        "model.embedding_dim": {"int": [0, 8]},  # 0 fails the config's own check
        "train.epochs": {"between": [1, 2]},  # unknown kind
    }
    for key, spec in cases.items():
        cfg = load_config(raw={**_raw(gen_dir, tmp_path), "tune": {"search_space": {key: spec}}})
        with pytest.raises(ConfigError, match=f"tune.search_space.{key}"):
            parse_space(cfg)
    start_cases = {"tune.start_points.0: a start point gives every key": [START[0] | {"train.epochs": 2}],
                   "tune.start_points.1.train.lr: 0.5 is outside": [START[0], START[1] | {"train.lr": 0.5}]}
    for needle, points in start_cases.items():
        with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
            parse_space(load_config(raw=_raw(gen_dir, tmp_path, start_points=points)))
    # through the CLI: exit 2 naming the key, and no search directory was created
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({**_raw(gen_dir, tmp_path, name="bad"),
                               "tune": {"search_space": {"model.depth": {"int": [1, 3]}}}}))
    out = subprocess.run([sys.executable, "-m", "raycluster", "tune", "--config", str(bad)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "tune.search_space.model.depth" in out.stderr
    assert not (tmp_path / "runs" / "bad").exists()
