"""`rankray score` (issue 19, item 4): batch inference of a bundle over Parquet files, local and on S3 (the moto
server): every input row scored once, equal to the offline score; one output file per input file, so a rerun
resumes; the top K of each group, ranked, as pandas ranks them; bad input fails before any scoring."""
from __future__ import annotations

import os

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from raycluster.cli import main
from tests.helpers import untrained_bundle
from training import storage
from training.batchscore import RANK, SCORE, output_name, score, scorer_count
from training.bundle import load_bundle
from training.features import DataError
from training.scoring import score_columns
from training.synth import generate_shard

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> str:
    return untrained_bundle(str(tmp_path_factory.mktemp("score") / "bundle"))


def _inputs(root) -> list[pa.Table]:
    """Three files of raw rows (one in a subdirectory, one empty), as a user's logs would be laid out."""
    tables = [generate_shard(6000, 0, i, 2) for i in range(2)] + [generate_shard(10, 0, 0, 1).slice(0, 0)]
    for t, rel in zip(tables, ["day=1/a.parquet", "day=2/a.parquet", "empty.parquet"]):
        os.makedirs(os.path.dirname(f"{root}/{rel}"), exist_ok=True)
        pq.write_table(t, f"{root}/{rel}")
    return tables


def _offline(bundle: str, t: pa.Table) -> np.ndarray:
    pp, model, _ = load_bundle(bundle)
    return score_columns(pp, model, {c: t.column(c) for c in pp.input_columns})[0] if t.num_rows else np.zeros(0)


def test_every_row_scored_once_as_offline_and_a_rerun_resumes(bundle, tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    tables = _inputs(src)
    keep = ["user_id", "job_id", "label"]
    assert main(["score", "--model", bundle, "--data", str(src), "--out", str(out), "--keep", *keep,
                 "--batch-size", "1000"]) == 0
    files = sorted(storage.list_files(str(src)))
    for f, t in zip(files, [tables[0], tables[1], tables[2]]):
        got = pq.read_table(out / output_name(str(src), f))
        assert got.column_names == keep + [SCORE] and got.num_rows == t.num_rows  # each row once, in order
        assert got.select(keep).equals(t.select(keep).cast(got.select(keep).schema))
        np.testing.assert_allclose(got[SCORE].to_numpy(), _offline(bundle, t), rtol=0, atol=1e-6)
    assert "6,000 rows in 3 file(s)" in capsys.readouterr().out

    # a stopped run is resumed: the files already written are kept, the missing one is scored
    kept = out / output_name(str(src), files[1])
    before = kept.stat().st_mtime_ns
    os.remove(out / output_name(str(src), files[0]))
    again = score(bundle, str(src), str(out), keep=keep)
    assert (again["scored_now"], again["already_done"], again["rows_scored_now"]) == (1, 2, 3000)
    assert kept.stat().st_mtime_ns == before
    assert pq.read_table(out / output_name(str(src), files[0])).num_rows == 3000
    assert not [p for p in os.listdir(out) if ".tmp-" in p]


def test_top_k_per_group_on_s3_matches_pandas(bundle, tmp_path, s3_server):
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="score")
    tables = _inputs(tmp_path / "in")
    for f in storage.list_files(str(tmp_path / "in")):
        s3.upload_file(f, "score", "in/" + os.path.relpath(f, tmp_path / "in"))
    res = score(bundle, "s3://score/in", "s3://score/top", keep=["job_id"], top_k=3, group="user_id")
    assert res["rows_scored_now"] == 6000 and res["scored_now"] == 3

    fs = pafs.S3FileSystem(endpoint_override=s3_server.split("://")[1], scheme="http", region="us-east-1")
    got = pq.read_table([f.path for f in fs.get_file_info(pafs.FileSelector("score/top"))
                         if f.path.endswith(".parquet")], filesystem=fs).to_pandas()
    rows = pa.concat_tables(tables[:2])
    want = rows.select(["user_id", "job_id"]).to_pandas().assign(**{SCORE: np.concatenate(
        [_offline(bundle, t) for t in tables[:2]]).astype(np.float32)})
    want = want.sort_values(SCORE, ascending=False, kind="stable").groupby("user_id").head(3)
    want[RANK] = want.groupby("user_id").cumcount() + 1
    assert res["rows_written"] == len(got) == len(want)
    key = ["user_id", RANK]
    a, b = got.sort_values(key).reset_index(drop=True), want.sort_values(key).reset_index(drop=True)
    assert (a["user_id"].to_numpy() == b["user_id"].to_numpy()).all() and (a[RANK] == b[RANK]).all()
    np.testing.assert_allclose(a[SCORE], b[SCORE], rtol=0, atol=1e-6)  # ties may swap rows, never scores
    assert set(got.columns) == {"job_id", "user_id", SCORE, RANK}


def test_bad_input_fails_before_any_scoring(bundle, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    t = generate_shard(50, 0, 0, 1)
    pq.write_table(t, src / "good.parquet")
    pq.write_table(t.drop(["budget"]), src / "no_budget.parquet")
    with pytest.raises(DataError, match=r"no_budget.parquet has no column 'budget'"):
        score(bundle, str(src), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="--top-k and --group go together"):
        score(bundle, str(src), str(tmp_path / "out"), top_k=5)
    with pytest.raises(DataError, match="--keep.*'nope'|no column 'nope'"):
        score(bundle, str(src / "good.parquet"), str(tmp_path / "out"), keep=["nope"])


def test_scorers_one_per_gpu_else_one_per_cpu_never_more_than_files():
    assert scorer_count({"CPU": 16, "GPU": 2}, 10) == (2, "cuda")
    assert scorer_count({"CPU": 2}, 10) == (2, "cpu")
    assert scorer_count({"CPU": 8}, 3) == (3, "cpu")
    assert scorer_count({}, 0) == (1, "cpu")
