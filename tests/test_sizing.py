"""Size-aware training defaults (training.sizing): "auto" budgets in steps and patience in epochs, so that
small data gets enough steps and patience, large data a few epochs with evaluations inside them."""
import pytest

from training.config import load_config
from training.loop import LR_FLOOR, WARMUP_MAX, WARMUP_SHARE, Plan, lr_factor
from training.sizing import BUDGET_STEPS, sized

BASE = {"data": {"source": "x.parquet"}, "features": {"label": "y", "features": [{"name": "a", "type": "categorical"}]}}


def _cfg(**train):
    return load_config(raw={**BASE, "train": train})


@pytest.mark.parametrize("rows", [40_000, 70_000, 800_000, 10_000_000])
def test_auto_budget_in_steps_and_patience_in_epochs(rows):
    cfg = sized(_cfg(), rows)
    t = cfg.train
    plan = Plan.of(cfg, rows, 1)
    total = t.epochs * plan.steps_per_epoch
    assert 256 <= t.batch_size <= 2048 and t.batch_size & (t.batch_size - 1) == 0
    assert total >= min(BUDGET_STEPS, 50 * plan.steps_per_epoch) and t.epochs >= 2  # enough steps
    steps_per_eval = plan.steps_per_epoch / t.evals_per_epoch
    assert t.patience >= 2 and t.patience * steps_per_eval >= 200  # patience spans 200+ steps
    assert 1 <= t.evals_per_epoch <= 4
    # ASHA's first rung: never inside the first quarter epoch, and two halvings before the budget ends
    assert cfg.tune.grace_period >= 0.25 and cfg.tune.grace_period * cfg.tune.reduction_factor ** 2 >= t.epochs - 0.05


def test_small_data_gets_smaller_batches_more_epochs_and_a_later_grace_than_large():
    small, large = sized(_cfg(), 50_000).train, sized(_cfg(), 10_000_000).train
    assert small.batch_size < large.batch_size and small.epochs > 10 > large.epochs
    assert small.evals_per_epoch == 1 and large.evals_per_epoch == 4
    assert small.patience >= 3 and large.patience == 2  # epochs of a small run; half an epoch of a large one
    assert sized(_cfg(), 50_000).tune.grace_period > 1 > sized(_cfg(), 10_000_000).tune.grace_period


def test_numbers_in_the_config_are_kept():
    cfg = load_config(raw={**BASE, "train": {"batch_size": 128, "epochs": 7, "evals_per_epoch": 2, "patience": 1},
                           "tune": {"grace_period": 0.5}})
    assert sized(cfg, 10_000_000) is cfg
    part = sized(_cfg(epochs=3), 800_000).train
    assert part.epochs == 3 and part.batch_size == 2048 and part.evals_per_epoch == 3


def test_auto_or_a_positive_number_only():
    from training.config import ConfigError

    with pytest.raises(ConfigError, match="train.epochs"):
        _cfg(epochs="many")
    with pytest.raises(ConfigError, match="train.batch_size"):
        _cfg(batch_size=0)


def test_lr_schedule_warms_up_then_decays_to_a_tenth_and_resumes_on_the_same_curve():
    total = 4000
    f = [lr_factor(s, total, "warmup_cosine") for s in range(total)]
    warm = min(WARMUP_MAX, int(WARMUP_SHARE * total))
    assert f[0] == pytest.approx(1 / warm) and f[warm - 1] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:warm - 1], f[1:warm]))  # rising through the warm-up
    assert all(a >= b for a, b in zip(f[warm:], f[warm + 1:]))  # then never rising
    assert f[-1] == pytest.approx(LR_FLOOR, abs=1e-5) and f[(warm + total) // 2] == pytest.approx(0.55, abs=1e-3)
    assert lr_factor(10 * total, total, "warmup_cosine") == pytest.approx(LR_FLOOR)  # past the budget: the floor
    assert warm > 1 and lr_factor(WARMUP_MAX - 1, 10**8, "warmup_cosine") == pytest.approx(1.0)  # warm-up capped
    assert {lr_factor(s, total, "constant") for s in (0, 1000, 3999)} == {1.0}
