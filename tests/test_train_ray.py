"""Ray Train end to end on a real local Ray: 2 DDP workers, exact metrics, resume, worker fault, bundle."""
import json
import os
import signal
import threading
import time

import numpy as np
import pytest

from raycluster.config import load_config
from training import synth
from training.bundle import BundleError, load_bundle
from training.evaluate import score_split
from training.evalmetrics import roc_auc
from training.trainer import make_trainer, train
from training.prepare import encoded_datasets, ensure_prepared

from .conftest import raylet_pid, train_workers

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def gen_dir(tmp_path_factory, ray_local):
    out = str(tmp_path_factory.mktemp("gen") / "mk")
    synth.generate(120_000, out, seed=1, shards=2)
    return out


@pytest.fixture(scope="module")
def gen_1m(tmp_path_factory, ray_local):
    """Demo-sized data: enough rows per user and job for the learnable part of p_true to be learned."""
    out = str(tmp_path_factory.mktemp("gen1m") / "mk")
    synth.generate(1_000_000, out, seed=1, shards=4)
    return out


def _cfg(gen_dir, tmp_path, name="t", **train):
    raw = load_config("configs/demo.yaml").model_dump(mode="json")
    raw["run"] = {"name": name, "dir": str(tmp_path / "runs")}
    raw["data"].update(source=gen_dir, generate=None)
    raw["train"].update({"num_workers": 2, "cpus_per_worker": 0.5, "epochs": 2, "batch_size": 2048,
                         "storage_path": str(tmp_path / "ckpt"), "log_every": 20, "evals_per_epoch": 1, **train})
    return load_config(raw=raw)


def test_two_workers_beat_logreg_and_report_exact_metrics(gen_1m, tmp_path):
    cfg = _cfg(gen_1m, tmp_path, evals_per_epoch=4)  # the default: the Bayes-ratio bar was measured with it
    deep = train(cfg)
    m = deep.metrics
    assert m["final"] and m["epochs_run"] >= 1 and json.loads(m["starts"]) == [0]
    # metrics cover all test rows (both workers' shards), not rank 0's half
    prep = ensure_prepared(cfg)
    assert m["test_rows"] == prep["profile"]["rows_by_split"]["test"]
    assert 0.5 < m["test_bayes_auc"] < 1 and m["test_bayes_ratio"] == pytest.approx(
        (m["test_auc"] - 0.5) / (m["test_bayes_auc"] - 0.5))
    # Measured 0.901 and 0.908 here (target 0.9); 0.88 leaves room for run-to-run noise while still
    # failing any model that misses the crosses (logreg measures ~0.61 on the same split).
    assert m["test_bayes_ratio"] >= 0.88, m["test_bayes_ratio"]
    base = train(_cfg(gen_1m, tmp_path, name="lr", epochs=1).model_copy(
        update={"model": cfg.model.model_copy(update={"name": "logreg"})}), write_bundle=False)
    assert m["test_auc"] > base.metrics["test_auc"] + 0.005, (m["test_auc"], base.metrics["test_auc"])
    print(f"dcnv2 test AUC {m['test_auc']:.4f} (Bayes ratio {m['test_bayes_ratio']:.3f}) vs logreg "
          f"{base.metrics['test_auc']:.4f}")
    # bundle round trip: the bundle's own transform + weights give the same test AUC as training measured
    pp, model, meta = load_bundle(deep.bundle)
    pred = score_split(cfg, pp, model, "test")
    assert roc_auc(pred["y"], pred["p"]) == pytest.approx(m["test_auc"], abs=1e-6)
    assert meta["metrics"]["test_auc"] == pytest.approx(m["test_auc"], abs=1e-6)
    assert os.path.exists(os.path.join(deep.bundle, "report.html"))
    # a tampered bundle is refused
    w = os.path.join(deep.bundle, "weights.safetensors")
    data = bytearray(open(w, "rb").read())
    data[-5] ^= 0xFF
    open(w, "wb").write(bytes(data))
    with pytest.raises(BundleError, match="weights.safetensors: checksum mismatch"):
        load_bundle(deep.bundle)


def test_second_run_with_same_name_resumes(gen_dir, tmp_path):
    first = train(_cfg(gen_dir, tmp_path, name="resume", epochs=1, num_workers=1, cpus_per_worker=1), write_bundle=False)
    assert first.metrics["epochs_run"] == 1
    again = train(_cfg(gen_dir, tmp_path, name="resume", epochs=2, num_workers=1, cpus_per_worker=1, patience=5),
                  write_bundle=False)
    assert json.loads(again.metrics["starts"]) == [0, 1]  # started again at the saved epoch 1, not 0
    assert again.metrics["epochs_run"] == 2 and len(json.loads(again.metrics["history"])) == 2


def test_killed_worker_resumes_from_checkpoint(gen_dir, tmp_path):
    import ray

    cfg = _cfg(gen_dir, tmp_path, name="fault", epochs=5, patience=20, max_failures=1)
    prep = ensure_prepared(cfg)
    trainer = make_trainer(cfg, prep["preprocessor"], encoded_datasets(prep["encoded"], cfg), "fault",
                           prep["profile"]["rows_by_split"]["train"])
    box = {}
    th = threading.Thread(target=lambda: box.update(result=trainer.fit()))
    th.start()
    run_dir = tmp_path / "ckpt" / "fault"
    deadline = time.time() + 240
    while time.time() < deadline and not (run_dir.exists() and any(p.name.startswith("checkpoint_") for p in run_dir.iterdir())):
        time.sleep(0.2)
    time.sleep(3)  # the controller registers the checkpoint just after its directory appears
    # Ray names worker processes after the actor they host: kill a real train worker of this test's Ray
    workers = train_workers(raylet_pid())
    assert workers, "no train worker to kill"
    os.kill(workers[0].pid, signal.SIGKILL)
    th.join(timeout=400)
    result = box["result"]
    assert result.error is None
    starts = json.loads(result.metrics["starts"])
    assert len(starts) == 2 and starts[1] >= 1, starts  # restarted once, from a saved epoch
    assert result.metrics["epochs_run"] == 5 and np.isfinite(result.metrics["test_auc"])
    assert ray.is_initialized()


def test_movielens_deep_model_beats_logreg(tmp_path):
    """Real data: the shipped MovieLens config, unchanged but for where outputs go."""
    over = [f"run.dir={tmp_path / 'runs'}", f"train.storage_path={tmp_path / 'ckpt'}", "train.epochs=3"]
    deep = train(load_config("configs/movielens.yaml", over), write_bundle=False)
    base = train(load_config("configs/movielens.yaml", over + ["model.name=logreg", "run.name=ml-logreg",
                                                                 "train.epochs=10", "train.patience=3",
                                                                 "train.evals_per_epoch=1"]),
                 write_bundle=False)
    print(f"movielens dcnv2 test AUC {deep.metrics['test_auc']:.4f} vs logreg {base.metrics['test_auc']:.4f}")
    assert deep.metrics["test_auc"] > base.metrics["test_auc"]
    assert deep.metrics["test_rows"] > 9000 and 0 < deep.metrics["test_gauc"] < 1
