"""training.synth generator and training.evalmetrics.roc_auc."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from training import synth
from training.evalmetrics import roc_auc

ROWS = 200_000


@pytest.fixture(scope="module")
def big() -> pa.Table:
    return synth.generate_shard(ROWS, seed=0, shard=0, num_shards=1)


def test_schema_and_ranges(big: pa.Table) -> None:
    assert big.num_rows == ROWS
    assert big.column_names == ["ts", "user_id", "user_country", "user_skills", "hourly_rate", "tier", "job_id",
                                "job_category", "job_skills", "budget", "client_country", "hour", "device",
                                "position", "p_true", "label"]
    d = {c: big[c].to_numpy() for c in ("ts", "hour", "position", "p_true", "label", "user_id", "job_id")}
    assert d["user_id"].dtype == np.int64 and d["job_id"].dtype == np.int64 and d["label"].dtype == np.int8
    assert ((d["p_true"] > 0) & (d["p_true"] < 1)).all()
    assert d["hour"].min() >= 0 and d["hour"].max() <= 23
    assert d["position"].min() >= 1 and d["position"].max() <= 20
    assert synth.START_TS <= d["ts"].min() and d["ts"].max() < synth.START_TS + 30 * 86400
    skills = big["user_skills"].to_pylist()[:1000]
    assert all(1 <= len(s.split("|")) <= 5 for s in skills)
    assert set(big["tier"].unique().to_pylist()) == {"new", "rising", "top"}
    n_users, n_jobs = synth.entity_counts(ROWS)
    assert len(np.unique(d["user_id"])) <= n_users and len(np.unique(d["job_id"])) <= n_jobs


def test_base_rate_and_bayes_auc(big: pa.Table) -> None:
    p, y = big["p_true"].to_numpy(), big["label"].to_numpy()
    assert 0.03 <= p.mean() <= 0.10
    assert 0.03 <= y.mean() <= 0.10
    assert 0.7 < roc_auc(y, p) < 0.95


def test_deterministic_by_seed() -> None:
    a = synth.generate_shard(5000, seed=3, shard=1, num_shards=3)
    assert a.equals(synth.generate_shard(5000, seed=3, shard=1, num_shards=3))
    assert not a.equals(synth.generate_shard(5000, seed=4, shard=1, num_shards=3))
    assert not a.equals(synth.generate_shard(5000, seed=3, shard=2, num_shards=3))


@pytest.mark.parametrize("rows,shards", [(1000, 1), (1001, 3), (7, 8), (20_000, 7)])
def test_shard_rows_sum(rows: int, shards: int) -> None:
    counts = [synth.generate_shard(rows, seed=0, shard=k, num_shards=shards).num_rows for k in range(shards)]
    assert sum(counts) == rows and max(counts) - min(counts) <= 1


def test_shard_out_of_range() -> None:
    with pytest.raises(ValueError):
        synth.generate_shard(100, seed=0, shard=2, num_shards=2)


def test_generate_with_ray(ray_local, tmp_path: Path) -> None:
    (tmp_path / "part-00009.parquet").write_bytes(b"stale")  # overwritten runs drop old parts
    r = synth.generate(rows=20_000, out=str(tmp_path), shards=2)
    files = sorted(tmp_path.glob("part-*.parquet"))
    assert [f.name for f in files] == ["part-00000.parquet", "part-00001.parquet"]
    assert sorted(r["files"]) == [str(f) for f in files]
    assert r["rows"] == 20_000 == sum(pq.read_metadata(f).num_rows for f in files)
    assert 0.6 < r["bayes_auc_test"] < 0.97
    assert 0.02 < r["base_rate"] < 0.1 and r["seconds"] > 0 and r["rows_per_s"] > 0
    assert pq.read_table(files[1]).equals(synth.generate_shard(20_000, seed=0, shard=1, num_shards=2))
