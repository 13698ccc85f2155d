"""Training faults on a real Ray (issue 7, part 1): train workers killed mid-epoch, a worker node
removed, the driver killed and the run submitted again, and checkpoints torn by a writer killed
mid-write (local disk and S3). Real processes, real files, no mocks.

Each test prints the figures it measured (restarts, epochs recomputed, AUC gap, seconds) on a
`FIGURES` line: run with `-s` to see them.

The node-removal test needs a multi-node `ray.cluster_utils.Cluster`: it stops the shared Ray (the
module runs among the last, `own_ray`), and a later test that needs the shared one starts it again."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray

from training.config import dump_config, load_config
from training import storage, synth
from training.checkpoint import MANIFEST, CheckpointError, verify_checkpoint
from training.prepare import ensure_prepared
from training.reader import encoded_datasets
from training.trainer import make_trainer

from tests.helpers import raylet_pid as _raylet_pid, train_workers as _train_workers

pytestmark = [pytest.mark.slow, pytest.mark.own_ray]

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the registered checkpoints
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def local_ray(ray_local):
    yield


@pytest.fixture(scope="module")
def gen(tmp_path_factory, ray_local):
    """100k synthetic rows, prepared once under one run dir (run.name `faults`) that every test shares."""
    base = tmp_path_factory.mktemp("faults")
    out = str(base / "data")
    synth.generate(100_000, out, seed=1, shards=2)
    return {"data": out, "runs": str(base / "runs")}


def _cfg(gen, storage_path, **train):
    raw = load_config(REPO / "configs" / "demo.yaml").model_dump(mode="json")
    raw["run"] = {"name": "faults", "dir": gen["runs"]}
    raw["data"].update(source=gen["data"], generate=None)
    raw["ray"] = {**raw.get("ray", {}), "num_cpus": 2, "include_dashboard": False}
    raw["train"].update({"num_workers": 2, "cpus_per_worker": 0.5, "epochs": 4, "batch_size": 2048,
                         "storage_path": str(storage_path), "log_every": 20, "patience": 50, "seed": 0,
                         "evals_per_epoch": 1, **train})  # one evaluation per epoch: faults are the subject
    return load_config(raw=raw)


def _trainer(cfg, name):
    """What `training.trainer.train` builds (materialized encoded splits), for a run name of our own."""
    prep = ensure_prepared(cfg)
    return make_trainer(cfg, prep["preprocessor"], encoded_datasets(prep["encoded"], cfg, prep), name,
                        prep["profile"]["rows_by_split"]["train"])


class Fit:
    """trainer.fit() on a thread, so the test can hurt the run while it trains."""

    def __init__(self, trainer):
        self.box: dict = {}
        self.t0 = time.time()
        self.thread = threading.Thread(target=self._run, args=(trainer,), daemon=True)
        self.thread.start()

    def _run(self, trainer):
        try:
            self.box["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - reported by join()
            self.box["error"] = e
        self.box["seconds"] = time.time() - self.t0

    def join(self, timeout=600):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"training did not finish within {timeout} s"
        if "error" in self.box:
            raise self.box["error"]
        return self.box["result"]


def _wait(pred, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _registered(run_dir) -> tuple[str | None, dict]:
    """(name, metrics) of the run's latest checkpoint as Ray Train registered it (what a restart loads)."""
    try:
        snap = json.loads((Path(run_dir) / SNAPSHOT).read_text())
    except (FileNotFoundError, ValueError):  # not there yet, or caught mid-write
        return None, {}
    latest = snap.get("latest_checkpoint_result") or {}
    return latest.get("checkpoint_dir_name"), latest.get("metrics") or {}


def _ckpt_dirs(run_dir) -> list[Path]:
    run_dir = Path(run_dir)
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_")) if run_dir.exists() else []


def _state_epoch(ckpt_dir: Path) -> int | None:
    try:
        return json.loads((ckpt_dir / "state.json").read_text())["state"]["epoch"]
    except (FileNotFoundError, ValueError, KeyError):
        return None


def _figures(**kw):
    print("FIGURES " + json.dumps(kw, default=float), flush=True)


# ---------------------------------------------------------------- 1. train workers killed mid-epoch
def test_worker_killed_twice_resumes_from_latest_checkpoint_and_matches_undisturbed_auc(gen, local_ray, tmp_path):
    cfg = _cfg(gen, tmp_path / "ckpt", epochs=4, max_failures=2)
    calm_fit = Fit(_trainer(cfg, "calm"))
    calm = calm_fit.join()
    assert calm.error is None and json.loads(calm.metrics["starts"]) == [0]
    # 2 DDP workers: validation over both workers' shards (not rank 0's half), at every evaluation; Ray
    # Train's split into equal shards leaves out at most one row per worker but the first
    valid = ensure_prepared(cfg)["profile"]["rows_by_split"]["valid"]
    seen = [h["valid_rows"] for h in json.loads(calm.metrics["history"])]
    assert len(seen) == 4 and all(valid - 1 <= v <= valid for v in seen), (seen, valid)

    run_dir = tmp_path / "ckpt" / "kills"
    fit = Fit(_trainer(cfg, "kills"))
    raylet = _raylet_pid()
    expected, killed, lost, regroup, recovery = [], [], [], [], []
    for i in range(3):
        # a checkpoint the current worker group registered (after a kill: one the restarted group made)
        _wait(lambda: (r := _registered(run_dir))[0] and r[0] not in {k[0] for k in killed}, 300,
              "a new registered checkpoint")
        registered_at = time.time()
        if killed:
            recovery.append(registered_at - killed[-1][2])
        if i == 2:
            break
        time.sleep(1.0)  # into the next epoch (~3-4 s of training here): the kill lands mid-epoch
        workers = _train_workers(raylet)
        assert len(workers) == 2, [w.pid for w in workers]
        name, m = _registered(run_dir)  # the latest at the moment of the kill: what the restart must load
        victim = workers[-1]
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.time()
        lost.append(killed_at - registered_at)
        expected.append(int(m["epoch"]))
        killed.append((name, victim.pid, killed_at))
        old = {w.pid for w in workers}
        _wait(lambda old=old: len([w for w in _train_workers(raylet) if w.pid not in old]) == 2, 300, "a new worker group")
        regroup.append(time.time() - killed_at)
    result = fit.join()
    assert result.error is None
    m = result.metrics
    starts = json.loads(m["starts"])
    assert len(starts) - 1 == 2, starts  # two restarts
    assert all(s >= 1 for s in starts[1:]) and starts == sorted(starts), starts
    assert starts[1:] == expected, (starts, expected)  # each restart loaded the latest registered checkpoint
    history = json.loads(m["history"])
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]  # no epoch trained twice in the kept history
    assert m["epochs_run"] == 4 and calm.metrics["epochs_run"] == 4
    gap = abs(m["best_valid_auc"] - calm.metrics["best_valid_auc"])
    _figures(case="worker killed twice", restarts=len(starts) - 1, starts=starts, killed_after_ckpt_of_epoch=expected,
             partial_epoch_seconds_lost=[round(x, 1) for x in lost],
             epochs_recomputed=sum(e - s for e, s in zip(expected, starts[1:])),
             seconds_kill_to_new_workers=[round(x, 1) for x in regroup],
             seconds_kill_to_next_checkpoint=[round(x, 1) for x in recovery],
             valid_auc=m["best_valid_auc"], undisturbed_valid_auc=calm.metrics["best_valid_auc"], auc_gap=gap,
             seconds=fit.box["seconds"], undisturbed_seconds=calm_fit.box["seconds"])
    assert gap <= 0.01, (m["best_valid_auc"], calm.metrics["best_valid_auc"])


# ---------------------------------------------------------------- 4. checkpoints torn by a killed writer
WRITER = r"""
import json, os, sys, time
from training import storage
src, dst = sys.argv[1], sys.argv[2]
fs, base = storage.filesystem(dst)
fs.create_dir(base, recursive=True)

def put(name, data, chunks=1, pause=0.0):
    step = -(-len(data) // chunks)
    with fs.open_output_stream(f"{base}/{name}") as f:
        for i in range(0, len(data), step):
            f.write(data[i:i + step])
            f.flush()
            print(f"wrote {name} {i + step}", flush=True)
            time.sleep(pause)

# a newer training state saved under this name: state first, then the weights, the manifest last
meta = json.load(open(os.path.join(src, "state.json")))
meta["state"]["epoch"] = 99
put("state.json", json.dumps(meta).encode())
best = bytearray(open(os.path.join(src, "best.safetensors"), "rb").read())
best[-8:] = bytes(8)
put("best.safetensors", bytes(best))
model = bytearray(open(os.path.join(src, "model.safetensors"), "rb").read())
model[-8:] = bytes(8)
print("model", flush=True)
put("model.safetensors", bytes(model), chunks=10, pause=0.5)  # killed in here
put("manifest.json", b"{}")
print("done", flush=True)
"""


def _killed_writer(src_dir: str, dst: str, log: Path) -> str:
    """Run WRITER into `dst` and SIGKILL it while it writes model.safetensors; returns its output."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(log, "w") as out:
        p = subprocess.Popen([sys.executable, "-c", WRITER, src_dir, dst], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                             stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait(lambda: "wrote model.safetensors" in log.read_text() or p.poll() is not None, 60,
                  "the writer to start on model.safetensors")
            time.sleep(0.7)  # one or two more chunks
            os.killpg(p.pid, signal.SIGKILL)
        finally:
            p.wait(30)
    text = log.read_text()
    assert "wrote model.safetensors" in text and "done" not in text, text  # killed mid-write
    return text


def _local_copy(uri: str, dest: Path) -> Path:
    """A checkpoint directory (local path or s3://) as local files."""
    import pyarrow.fs as pafs

    fs, p = storage.filesystem(uri)
    dest.mkdir(parents=True)
    pafs.copy_files(p, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return dest


@pytest.mark.parametrize("where", ["local", "s3"])
def test_checkpoint_torn_by_killed_writer_is_never_loaded(gen, local_ray, tmp_path, where):
    if where == "s3":
        import boto3

        boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="faults")
        store = f"s3://faults/{tmp_path.name}"  # a fresh prefix: the moto server lives for the whole session
    else:
        store = str(tmp_path / "ckpt")
    run = storage.join(store, "torn")
    t0 = time.time()
    first = _trainer(_cfg(gen, store, epochs=1, num_workers=1, cpus_per_worker=1), "torn").fit()
    assert first.error is None
    snap = json.loads(storage.read_text(storage.join(run, SNAPSHOT)))
    older, latest = [r["checkpoint_dir_name"] for r in snap["checkpoint_results"]]  # num_to_keep=2
    assert snap["latest_checkpoint_result"]["checkpoint_dir_name"] == latest
    good = _local_copy(storage.join(run, latest), tmp_path / "good")
    assert set(verify_checkpoint(str(good))) >= {"model.safetensors", "best.safetensors", "state.json"}

    # (a) a copy of a newer checkpoint killed part way: a checkpoint_* dir Ray never registered
    partial = f"checkpoint_{time.strftime('%Y-%m-%d_%H-%M-%S', time.gmtime(time.time() + 3600))}.000000"
    _killed_writer(str(good), storage.join(run, partial), tmp_path / "writer-a.log")
    # (b) the newest registered checkpoint rewritten in place by a writer killed part way
    _killed_writer(str(good), storage.join(run, latest), tmp_path / "writer-b.log")

    torn_new = _local_copy(storage.join(run, partial), tmp_path / "torn-new")
    torn_latest = _local_copy(storage.join(run, latest), tmp_path / "torn-latest")
    before = _local_copy(storage.join(run, older), tmp_path / "older")
    assert not (torn_new / MANIFEST).exists()  # what a killed writer leaves: no manifest
    assert json.loads((torn_latest / "state.json").read_text())["state"]["epoch"] == 99  # the new state got in
    if where == "local":  # a local file is truncated where the kill hit; an S3 object is all or nothing
        assert (torn_new / "model.safetensors").stat().st_size < (good / "model.safetensors").stat().st_size
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        verify_checkpoint(str(torn_latest))
    manifest = verify_checkpoint(str(before))  # the previous checkpoint: every file matches its sha256

    t1 = time.time()
    again = _trainer(_cfg(gen, store, epochs=2, num_workers=1, cpus_per_worker=1), "torn").fit()
    assert again.error is None
    m = again.metrics
    refused = json.loads(m["refused_checkpoints"])
    assert m["resumed_from"] == older, (m["resumed_from"], older, latest, partial)
    assert len(refused) == 1 and refused[0].startswith(f"{latest}: ") and "checksum mismatch" in refused[0], refused
    assert json.loads(m["starts"]) == [0, 1]  # epoch 1 from the complete checkpoint, not the torn state's 99
    assert m["epochs_run"] == 2 and np.isfinite(m["best_valid_auc"])
    assert storage.exists(storage.join(run, partial))  # left alone, and never offered by Ray
    _figures(case=f"torn checkpoint ({where})", resumed_from=m["resumed_from"], refused=refused,
             manifest_sha256={k: v["sha256"][:16] for k, v in manifest.items()}, starts=json.loads(m["starts"]),
             epochs_recomputed=0, first_seconds=t1 - t0, resume_seconds=time.time() - t1)


def _epoch_rows(log: str) -> set[int]:
    """Epochs whose end-of-epoch row ("epoch N train_loss ...") the training log shows."""
    return {int(line.split("[rankray train] epoch ", 1)[1].split()[0]) for line in log.splitlines()
            if "[rankray train] epoch " in line and " train_loss " in line}


# ---------------------------------------------------------------- 3. driver killed, run submitted again
def test_killed_driver_resubmitted_resumes_with_at_most_one_epoch_recomputed(gen, tmp_path):
    store = tmp_path / "ckpt"
    cfg = _cfg(gen, store, epochs=4, num_workers=1, cpus_per_worker=1)
    ensure_prepared(cfg)  # the CLI runs reuse this module's prepared data (same run dir and fingerprint)
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(dump_config(cfg))
    # --verbose: the workers' own lines (the epoch rows read below) come to the driver's log
    cmd = [sys.executable, "-m", "raycluster", "--verbose", "train", "--config", str(cfg_file), "--out",
           str(tmp_path / "bundle")]
    # on the run's Ray, as `ray job submit` runs a driver on a cluster that outlives it: the killed driver's
    # job ends, and its Train controller and workers with it
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    run_dir = store / "faults"

    t0 = time.time()
    log1 = tmp_path / "run1.log"
    with open(log1, "w") as out:
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait(lambda: p.poll() is not None or int(_registered(run_dir)[1].get("epoch", 0)) >= 2, 400,
                  "two registered checkpoints")
            assert p.poll() is None, log1.read_text()[-3000:]
            assert len(_ckpt_dirs(run_dir)) >= 2
            family = [p.pid] + [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
            os.killpg(p.pid, signal.SIGKILL)  # the driver (and anything it started)
        finally:
            p.wait(60)
    killed_at = time.time() - t0
    time.sleep(3)
    survivors = [pid for pid in family if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    for pid in survivors:  # none expected; never leave a stray Ray behind
        os.kill(pid, signal.SIGKILL)
    text1 = log1.read_text()
    done1 = _epoch_rows(text1)
    persisted = [e for e in map(_state_epoch, _ckpt_dirs(run_dir)) if e is not None]
    completed = max(done1 | set(persisted))  # epochs finished before the kill, logged or saved

    t1 = time.time()
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    resume_seconds = time.time() - t1
    text2 = second.stdout + second.stderr
    assert second.returncode == 0, text2[-4000:]
    _, final = _registered(run_dir)
    starts = json.loads(final["starts"])
    assert final["final"] and final["epochs_run"] == 4
    assert len(starts) == 2 and starts[1] >= 2, starts  # started again at a saved epoch >= 2
    assert f"resumed from the checkpoint of epoch {starts[1]}" in text2
    (tmp_path / "run2.log").write_text(text2)
    # (each worker line reaches the driver's output twice: Train's print patch and the log forwarding)
    done2 = sorted(_epoch_rows(text2))
    assert done2 == list(range(starts[1] + 1, 5)), done2  # only the epochs after the checkpoint ran again
    recomputed = completed - starts[1]
    _figures(case="driver killed + resubmitted", killed_after_s=killed_at, epochs_done_before_kill=completed,
             resumed_at_epoch=starts[1], epochs_recomputed=recomputed, survivors_of_killpg=len(survivors),
             resume_seconds=resume_seconds, epochs_trained_after_resume=done2)
    assert not survivors, survivors
    assert recomputed <= 1, (completed, starts)
    assert "trained dcnv2" in text2 and (tmp_path / "bundle" / "weights.safetensors").exists()


# ---------------------------------------------------------------- 2. a worker node removed while training
def test_removed_worker_node_restarts_from_checkpoint_on_remaining_node(gen, tmp_path, monkeypatch):
    import ray._common.utils
    import ray._private.utils
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.shutdown()
    # Cluster() writes, and its shutdown() deletes, the machine-wide "current cluster" file that other
    # people's `ray.init(address="auto")` / `ray` CLI calls follow: leave that file alone (we connect
    # by address)
    monkeypatch.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
    monkeypatch.setattr(ray._common.utils, "reset_ray_address", lambda *a, **k: None)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cfg = _cfg(gen, tmp_path / "ckpt", epochs=4, max_failures=1, data_cpus=0.5)
        trainer = _trainer(cfg, "node")  # encoded splits materialized on the head, before the worker node joins
        node = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()

        @ray.remote(num_cpus=0)
        class Blocker:
            def ready(self):
                return True

        # hold 1.5 of the head's 2 CPUs: at least one train worker (0.5 CPU each) must start on the worker node
        head_id = ray.get_runtime_context().get_node_id()
        blocker = Blocker.options(num_cpus=1.5, scheduling_strategy=NodeAffinitySchedulingStrategy(head_id, soft=False)).remote()
        ray.get(blocker.ready.remote())
        fit = Fit(trainer)
        run_dir = tmp_path / "ckpt" / "node"
        _wait(lambda: _registered(run_dir)[0], 300, "a registered checkpoint")
        time.sleep(1.0)
        on_node = _train_workers(_raylet_pid(node))
        assert on_node, "no train worker on the worker node"
        _, m = _registered(run_dir)
        ray.kill(blocker)  # the head can now hold both workers
        removed_at = time.time()
        cluster.remove_node(node, allow_graceful=False)
        result = fit.join()
        after_removal = time.time() - removed_at
        assert result.error is None
        starts = json.loads(result.metrics["starts"])
        _figures(case="worker node removed", workers_on_removed_node=len(on_node), restarts=len(starts) - 1,
                 starts=starts, removed_after_ckpt_of_epoch=m["epoch"], epochs_recomputed=0,
                 seconds_to_finish_after_removal=after_removal, seconds=fit.box["seconds"],
                 valid_auc=result.metrics["best_valid_auc"])
        assert len(starts) == 2 and starts[1] == int(m["epoch"]) >= 1, (starts, m.get("epoch"))
        assert result.metrics["epochs_run"] == 4 and np.isfinite(result.metrics["best_valid_auc"])
        assert [n["Alive"] for n in ray.nodes()].count(True) == 1
    finally:
        ray.shutdown()
        cluster.shutdown()
