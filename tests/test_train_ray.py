"""Ray Train end to end on the run's local Ray: a deep model that learns the generated data's crosses and
beats logreg, test scored once by the driver, the bundle, and the shipped MovieLens config through the CLI
with a short console. (2 DDP workers with metrics over every worker's rows, and a finished run resumed with
more epochs: tests/test_faults_train.py.)"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from training import synth
from training.bundle import BundleError, load_bundle
from training.config import load_config
from training.prepare import ensure_prepared
from training.trainer import train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]
ROOT = Path(__file__).resolve().parents[1]


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
    raw["train"].update({"num_workers": 1, "cpus_per_worker": 1, "epochs": 2, "batch_size": 2048,
                         "storage_path": str(tmp_path / "ckpt"), "log_every": 20, "evals_per_epoch": 1, **train})
    return load_config(raw=raw)


def test_deep_model_learns_the_crosses_and_beats_logreg(gen_1m, tmp_path):
    # the settings the Bayes-ratio bar was measured with (4 evaluations per epoch, patience 2 of them)
    cfg = _cfg(gen_1m, tmp_path, evals_per_epoch=4, patience=2)
    deep = train(cfg)
    m = deep.metrics
    assert m["final"] and m["epochs_run"] >= 1 and json.loads(m["starts"]) == [0]
    prep = ensure_prepared(cfg)
    assert m["test_rows"] == prep["profile"]["rows_by_split"]["test"] and m["test_passes"] == 1
    assert 0.5 < m["test_bayes_auc"] < 1 and m["test_bayes_ratio"] == pytest.approx(
        (m["test_auc"] - 0.5) / (m["test_bayes_auc"] - 0.5))
    # Measured 0.901 and 0.908 (target 0.9); 0.88 leaves room for run-to-run noise while still failing any
    # model that misses the crosses (logreg measures ~0.61 on the same split).
    assert m["test_bayes_ratio"] >= 0.88, m["test_bayes_ratio"]
    base = train(_cfg(gen_1m, tmp_path, epochs=1).model_copy(
        update={"model": cfg.model.model_copy(update={"name": "logreg"})}), run_name="lr", write_bundle=False)
    assert m["test_auc"] > base.metrics["test_auc"] + 0.005, (m["test_auc"], base.metrics["test_auc"])
    print(f"dcnv2 test AUC {m['test_auc']:.4f} (Bayes ratio {m['test_bayes_ratio']:.3f}) vs logreg "
          f"{base.metrics['test_auc']:.4f}")
    # the bundle holds what the run measured, and its report
    _, _, meta = load_bundle(deep.bundle)
    assert meta["metrics"]["test_auc"] == pytest.approx(m["test_auc"], abs=1e-12)
    assert os.path.exists(os.path.join(deep.bundle, "report.html"))
    # a tampered bundle is refused
    w = os.path.join(deep.bundle, "weights.safetensors")
    data = bytearray(open(w, "rb").read())
    data[-5] ^= 0xFF
    open(w, "wb").write(bytes(data))
    with pytest.raises(BundleError, match="weights.safetensors: checksum mismatch"):
        load_bundle(deep.bundle)


def test_movielens_through_the_cli_prints_a_short_console_and_beats_logreg(tmp_path):
    """Real data: `rankray train` with the shipped MovieLens config, unchanged but for where outputs go, as a
    user runs it (here on this run's Ray): fewer than 40 lines, none of Ray's progress blocks or worker
    lines; the deep model beats logreg trained on the same split."""
    over = [f"run.dir={tmp_path / 'runs'}", f"train.storage_path={tmp_path / 'ckpt'}"]
    env = {k: v for k, v in os.environ.items() if k != "RANKRAY_VERBOSE"}
    env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    out = subprocess.run([sys.executable, "-m", "raycluster", "train", "--config", "configs/movielens.yaml",
                          *[x for o in over for x in ("--set", o)]], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    lines = (out.stdout + out.stderr).splitlines()
    assert out.returncode == 0, "\n".join(lines[-40:])
    assert len(lines) < 40, "\n".join(lines)
    assert not [ln for ln in lines if "logging_progress" in ln or "pid=" in ln or "[rankray train]" in ln], lines
    assert any(ln.startswith("trained dcnv2 in") for ln in lines) and any(ln.startswith("test: ") for ln in lines)
    deep = load_bundle(str(tmp_path / "runs" / "movielens" / "model"))[2]["metrics"]
    base = train(load_config("configs/movielens.yaml", over + ["model.name=logreg", "train.epochs=10",
                                                                 "train.patience=3", "train.evals_per_epoch=1"]),
                 run_name="ml-logreg", write_bundle=False)  # same run: the prepared data is reused
    print(f"movielens dcnv2 test AUC {deep['test_auc']:.4f} vs logreg {base.metrics['test_auc']:.4f}")
    assert deep["test_auc"] > base.metrics["test_auc"]
    assert deep["test_rows"] > 9000 and 0 < deep["test_gauc"] < 1 and deep["test_passes"] == 1
