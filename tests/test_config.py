"""Config: YAML + --set, unknown keys / wrong types / missing fields fail naming the key path."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.config import ConfigError, config_with, dump_config, load_config, parse_yaml

from tests.helpers import SMALL_FEATURES

ROOT = Path(__file__).resolve().parents[1]
BASE = {"data": {"source": "x.parquet"}, "features": SMALL_FEATURES}


def _raw(**sections):
    import copy

    raw = copy.deepcopy(BASE)
    raw.update(sections)
    return raw


def test_defaults_and_overrides():
    cfg = load_config(raw=_raw(), overrides=["train.lr=0.003", "model.mlp=[64, 32]", "features.features.0.min_count=3"])
    assert cfg.train.lr == 0.003 and cfg.model.mlp == [64, 32]
    assert cfg.features.features[0].min_count == 3
    assert cfg.model.name == "dcnv2" and cfg.serve.host == "127.0.0.1"
    again = load_config(raw=parse_yaml(dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize("raw, overrides, needle", [
    (_raw(train={"lr": 0.1, "lrr": 1}), [], "train.lrr: unknown key"),
    (_raw(train={"epochs": "many"}), [], "train.epochs"),
    (_raw(), ["train.batch_size=0"], "train.batch_size"),
    (_raw(), ["model.name=transformer"], "model.name"),
    ({"features": SMALL_FEATURES}, [], "data: required key is missing"),
    (_raw(features={"features": SMALL_FEATURES["features"]}), [], "features.label: required key is missing"),
    (_raw(features={**SMALL_FEATURES, "features": [{"name": "x", "type": "embedding"}]}), [], "features.features.0"),
    (_raw(features={**SMALL_FEATURES, "features": [{"name": "x", "type": "numeric", "transform": "sqrt"}]}), [],
     "features.features.0.numeric.transform"),
    (_raw(features={**SMALL_FEATURES, "features": [{"name": "x", "type": "categorical", "hash_buckets": 8, "max_vocab": 4}]}),
     [], "hash_buckets cannot be combined"),
    (_raw(features={**SMALL_FEATURES, "time": None,
                    "features": [{"name": "seen", "type": "numeric", "count_by": "user"}]}),
     [], "feature 'seen': count_by counts earlier rows, so features.time must be set"),
    (_raw(features={**SMALL_FEATURES, "features": [{"name": "seen", "type": "numeric", "count_by": "user",
                                                    "source": "item"}]}),
     [], "feature 'seen': count_by makes the column itself"),
    (_raw(), ["nosuch.key=1"], "nosuch: unknown key"),
    (_raw(), ["train.lr"], "expected KEY=VALUE"),
    (_raw(data={"source": None, "split": {"kind": "random"}}), [], "data.source is required"),
])
def test_errors_name_the_key(raw, overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(raw=raw, overrides=overrides)
    assert needle in str(e.value)


def test_yaml_on_key_stays_a_string(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  source: r.csv\n  joins: [{path: m.csv, on: movieId}]\n"
                 "features: {label: y, features: [{name: a, type: categorical}]}\n")
    assert load_config(p).data.joins[0].on == "movieId"


def test_config_with_revalidates():
    cfg = load_config(raw=_raw())
    assert config_with(cfg, {"train.lr": 0.01}).train.lr == 0.01
    with pytest.raises(ConfigError, match="train.lr"):
        config_with(cfg, {"train.lr": -1})


def test_cli_bad_config_fails_before_any_work(tmp_path):
    """In a process of its own: this test process may already hold the run's shared Ray."""
    p = tmp_path / "bad.yaml"
    p.write_text("data: {source: x.parquet}\nfeatures: {label: y, features: [{name: a, type: categorical}]}\n"
                 "train: {epocs: 3}\n")
    code = ("import sys, ray; from raycluster.cli import main; rc = main(['prepare', '--config', sys.argv[1]]); "
            "print('ray initialized:', ray.is_initialized()); sys.exit(rc)")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", code, str(p)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stderr
    assert "train.epocs: unknown key" in out.stderr
    assert "ray initialized: False" in out.stdout


def test_yaml_12_numbers_and_booleans():
    from training.config import parse_yaml

    v = parse_yaml("lr: 1e-5\nr: [1e-05, 2E3]\nk: on\nb: true")
    assert v == {"lr": 1e-5, "r": [1e-5, 2000.0], "k": "on", "b": True}
