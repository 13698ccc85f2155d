"""Model bundle without Ray: round trips (local and moto S3), atomic overwrite, and every refusal."""
from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import safetensors.torch
import torch

from training.config import Config, FeaturesConfig, ModelConfig, load_config
from training.bundle import BundleError, load_bundle, save_bundle, verify_samples
from training.scoring import score_rows
from training.features import Preprocessor
from training.models import FieldSpec, build_model, model_arch

from tests.helpers import SMALL_FEATURES, small_table

MODEL_CFG = ModelConfig(embedding_dim=4, mlp=[16], cross_layers=1)


def _pp() -> Preprocessor:
    spec = FeaturesConfig.model_validate(SMALL_FEATURES)
    return Preprocessor(spec, vocab={"user": pa.array([5, 7, 9], pa.int64()), "item": pa.array([1, 2], pa.int64()),
                                     "color": pa.array(["red", "blue"]), "tags": pa.array(["a", "b", "c"])},
                        mean={"price": 1.0}, std={"price": 2.0}, fill={"price": 1.0})


def _model(pp: Preprocessor, seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    fields = [FieldSpec(f.name, pp.cardinality(f.name), len(pp.slots(f))) for f in pp.cat_features]
    torch.manual_seed(seed)
    model = build_model(MODEL_CFG, fields, len(pp.num_columns))
    with torch.no_grad():  # spread the scores: the default init puts every probability near 0.5
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model, model_arch(MODEL_CFG, fields, len(pp.num_columns))


def _cfg() -> Config:
    return load_config(raw={"data": {"source": "x"}, "features": SMALL_FEATURES})


def _rows(n: int = 12) -> list[dict[str, Any]]:
    return small_table(n, seed=1).to_pylist()


def _save(path: str, seed: int = 0, **kw: Any) -> str:
    pp = _pp()
    model, arch = _model(pp, seed)
    return save_bundle(path, _cfg(), pp, model, arch, {"auc": 0.75 + seed / 100}, _rows()[:5],
                       info={"trial": f"t{seed}"}, **kw)


def _rewrite_manifest(bundle: Path) -> None:
    """What a careful attacker does: make the manifest consistent with whatever files are present."""
    m = json.loads((bundle / "manifest.json").read_text())
    m["files"] = {p.name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size}
                  for p in bundle.iterdir() if p.name != "manifest.json"}
    (bundle / "manifest.json").write_text(json.dumps(m))


def test_round_trip_local(tmp_path: Path) -> None:
    pp = _pp()
    model, arch = _model(pp)
    version = save_bundle(str(tmp_path / "b"), _cfg(), pp, model, arch, {"auc": np.float64(0.8)}, _rows()[:4],
                          info={"trial": "t0", "params": {"lr": 0.01}}, report_html="<p>ok</p>")
    pp2, model2, meta = load_bundle(str(tmp_path / "b"))
    rows = _rows(50)
    before, after = score_rows(pp, model, rows), score_rows(pp2, model2, rows)
    assert before.dtype == np.float64 and before.std() > 0.01
    np.testing.assert_allclose(after, before, atol=1e-6)
    assert meta["version"] == version and meta["metrics"] == {"auc": 0.8}
    assert meta["info"] == {"trial": "t0", "params": {"lr": 0.01}}
    assert meta["config"] == _cfg() and meta["arch"] == arch and len(meta["samples"]["rows"]) == 4
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["format"] == "rankray.bundle/1" and "report.html" in manifest["files"]
    assert not model2.training and verify_samples(pp2, model2, meta) < 1e-6


def test_overwrite_replaces_atomically_without_leftovers(tmp_path: Path) -> None:
    path = str(tmp_path / "b")
    v1 = _save(path, seed=0, report_html="<p>old</p>")
    v2 = _save(path, seed=1)
    _, _, meta = load_bundle(path)
    assert v1 != v2 and meta["version"] == v2 and meta["info"] == {"trial": "t1"}
    assert not (tmp_path / "b" / "report.html").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no .tmp-* dirs left behind


def test_refuses_to_replace_a_directory_that_is_not_a_bundle(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "precious.csv").write_text("a,b\n")
    with pytest.raises(BundleError, match="not a model bundle"):
        _save(str(tmp_path / "runs"))
    assert (tmp_path / "runs" / "precious.csv").exists()


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    _save(str(tmp_path / "b"))
    w = tmp_path / "b" / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"weights\.safetensors: checksum mismatch"):
        load_bundle(str(tmp_path / "b"))


class _Exploit:
    """Unpickling this creates `marker`: proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_planted_pickle_is_never_unpickled(tmp_path: Path) -> None:
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Exploit(control)))
    assert control.exists()  # the payload is live
    marker = tmp_path / "pwned"
    bundle = tmp_path / "b"
    _save(str(bundle))
    (bundle / "evil.pkl").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(BundleError, match=r"evil\.pkl"):
        load_bundle(str(bundle))
    _rewrite_manifest(bundle)  # listed and checksummed: still refused by name
    with pytest.raises(BundleError, match=r"evil\.pkl"):
        load_bundle(str(bundle))
    (bundle / "evil.pkl").unlink()
    # A pickle disguised as the weights file with a consistent manifest: safetensors rejects it.
    (bundle / "weights.safetensors").write_bytes(pickle.dumps({"w": _Exploit(marker)}))
    _rewrite_manifest(bundle)
    with pytest.raises(BundleError, match=r"weights\.safetensors"):
        load_bundle(str(bundle))
    assert not marker.exists()


def test_unknown_file_is_refused(tmp_path: Path) -> None:
    _save(str(tmp_path / "b"))
    (tmp_path / "b" / "notes.txt").write_text("hi")
    with pytest.raises(BundleError, match=r"notes\.txt: file is not listed"):
        load_bundle(str(tmp_path / "b"))


def test_missing_or_invalid_manifest_is_refused(tmp_path: Path) -> None:
    _save(str(tmp_path / "b"))
    manifest = tmp_path / "b" / "manifest.json"
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, "format": "other/9"}))
    with pytest.raises(BundleError, match=r"manifest\.json: not a rankray\.bundle/1"):
        load_bundle(str(tmp_path / "b"))
    manifest.unlink()
    with pytest.raises(BundleError, match=r"manifest\.json: missing"):
        load_bundle(str(tmp_path / "b"))
    with pytest.raises(BundleError, match="missing"):
        load_bundle(str(tmp_path / "nowhere"))


def test_listed_file_missing_is_refused(tmp_path: Path) -> None:
    _save(str(tmp_path / "b"))
    (tmp_path / "b" / "samples.json").unlink()
    with pytest.raises(BundleError, match=r"samples\.json: listed in manifest\.json but missing"):
        load_bundle(str(tmp_path / "b"))


def test_verify_samples_catches_weights_that_do_not_match(tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    _save(str(bundle))
    pp, model, meta = load_bundle(str(bundle))
    assert verify_samples(pp, model, meta) < 1e-6
    other, _ = _model(pp, seed=7)
    state = {k: v.contiguous() for k, v in other.state_dict().items()}
    (bundle / "weights.safetensors").write_bytes(safetensors.torch.save(state))
    _rewrite_manifest(bundle)  # internally consistent, but the samples were scored by another model
    pp, model, meta = load_bundle(str(bundle))
    with pytest.raises(BundleError, match=r"samples\.json: model scores differ"):
        verify_samples(pp, model, meta)


def test_s3_round_trip_and_overwrite(s3_server: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket="bundles-test")
    path = "s3://bundles-test/bundles/b1"
    _save(path, seed=0, report_html="<p>old</p>")
    v2 = _save(path, seed=1)
    pp, model, meta = load_bundle(path)
    assert meta["version"] == v2 and meta["info"] == {"trial": "t1"} and meta["path"] == path
    assert verify_samples(pp, model, meta) < 1e-6
    ref_pp = _pp()
    ref_model, _ = _model(ref_pp, seed=1)
    np.testing.assert_allclose(score_rows(pp, model, _rows(30)), score_rows(ref_pp, ref_model, _rows(30)), atol=1e-6)
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="bundles-test")["Contents"]}
    assert "bundles/b1/report.html" not in keys  # stale file of the old bundle removed
    client.put_object(Bucket="bundles-test", Key="bundles/b1/evil.pkl", Body=b"x")
    with pytest.raises(BundleError, match=r"evil\.pkl"):
        load_bundle(path)
