"""Pipeline pieces that need no cluster: the deploy gate and stage skipping by fingerprint."""
import pytest

from training.config import load_config
from raycluster.pipeline import GateError, Stages, gate


def _cfg(tmp_path, **pipeline):
    raw = load_config("configs/demo.yaml").model_dump(mode="json")
    raw["run"] = {"name": "p", "dir": str(tmp_path)}
    raw["pipeline"] = {"min_test_auc": 0.7, **pipeline}
    return load_config(raw=raw)


def test_gate_refuses_a_weak_winner_and_says_why(tmp_path):
    cfg = _cfg(tmp_path)
    assert "deploy" in gate(cfg, 0.75, 0.70)
    with pytest.raises(GateError, match="below pipeline.min_test_auc 0.7000"):
        gate(cfg, 0.69, 0.60)
    with pytest.raises(GateError, match=r"does not beat the logreg baseline \(0.7600\)"):
        gate(cfg, 0.75, 0.76)
    assert "deploy" in gate(cfg, 0.75, None)  # pipeline.baseline: false
    # lightgbm on the same split is shown beside the winner, ahead or behind, and says what to do when ahead
    assert "> lightgbm 0.7400: deploy" in gate(cfg, 0.75, 0.70, 0.74)
    behind = gate(cfg, 0.75, 0.70, 0.78)
    assert "<= lightgbm 0.7800 (lightgbm is better here: more trials" in behind  # the demo's space holds lightgbm
    deep_only = load_config(raw={**cfg.model_dump(mode="json"),
                                 "tune": {"search_space": {"train.lr": {"loguniform": [0.001, 0.01]}}}})
    assert "add it to the search, tune.search_space model.name" in gate(deep_only, 0.75, 0.70, 0.78)
    with pytest.raises(GateError):
        gate(cfg, float("nan"), None)  # a NaN AUC is never good enough


def test_stages_are_skipped_until_their_inputs_change(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    calls = []

    def work():
        calls.append(1)
        return {"value": len(calls)}

    assert Stages(cfg).run("a", "fp1", work, 1) == {"value": 1}
    assert Stages(cfg).run("a", "fp1", work, 1) == {"value": 1} and len(calls) == 1  # a new process skips it
    assert "skipped" in capsys.readouterr().out
    assert Stages(cfg).run("a", "fp2", work, 1) == {"value": 2}  # inputs changed: runs again
    assert Stages(cfg).run("a", "fp2", work, 1, still_there=lambda o: False) == {"value": 3}  # outputs gone
