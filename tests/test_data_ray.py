"""The data layer on a real local Ray: read, validate, split, fit with Ray Data, encode, S3."""
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import ray.data

from training.config import load_config
from training.data import SPLIT, read_source, split_dataset
from training.features import OOV, DataError, Preprocessor
from training.prepare import compute_stats, encode_batch, prepare
from training.cache import content_key

from tests.helpers import SMALL_FEATURES, small_table

pytestmark = pytest.mark.usefixtures("ray_local")


def _write(table: pa.Table, d, parts: int = 3, fmt: str = "parquet") -> str:
    os.makedirs(d, exist_ok=True)
    step = -(-table.num_rows // parts)
    for i in range(parts):
        chunk = table.slice(i * step, step)
        if fmt == "parquet":
            pq.write_table(chunk, os.path.join(d, f"part-{i}.parquet"))
        else:
            pacsv.write_csv(chunk, os.path.join(d, f"part-{i}.csv"))
    return str(d)


def _cfg(source: str, tmp_path, **split) -> object:
    return load_config(raw={"run": {"dir": str(tmp_path / "runs"), "name": "t"},
                            "data": {"source": source, "split": {"kind": "random", **split}},
                            "features": SMALL_FEATURES})


def _ids_by_split(ds) -> dict[int, set]:
    t = ds.select_columns(["ts", SPLIT]).to_arrow_refs()
    table = pa.concat_tables(ray.get(t))
    return {s: set(table.filter(pc.equal(table[SPLIT], s))["ts"].to_pylist()) for s in range(3)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return _write(small_table(6000), tmp_path_factory.mktemp("pq"))


def test_random_split_identical_across_reads(data_dir, tmp_path):
    cfg = _cfg(data_dir, tmp_path, seed=7)
    a = _ids_by_split(split_dataset(cfg)[0])
    glob_cfg = _cfg(os.path.join(data_dir, "part-*.parquet"), tmp_path, seed=7)
    b = _ids_by_split(split_dataset(glob_cfg)[0])
    assert a == b and sum(len(v) for v in a.values()) == 6000
    assert 400 < len(a[1]) < 800 and 400 < len(a[2]) < 800


def test_time_split_never_puts_later_rows_in_train(data_dir, tmp_path):
    cfg = _cfg(data_dir, tmp_path)
    cfg.data.split.kind = "time"
    ids = _ids_by_split(split_dataset(cfg)[0])
    assert max(ids[0]) < min(ids[1]) and max(ids[1]) < min(ids[2])
    assert abs(len(ids[2]) - 600) < 60


def test_fit_and_encode_match_direct_transform(data_dir, tmp_path):
    cfg = _cfg(data_dir, tmp_path, seed=1)
    res = prepare(cfg)
    pp = res["preprocessor"]
    raw = pa.concat_tables(ray.get(split_dataset(cfg)[0].to_arrow_refs()))
    train = raw.filter(pc.equal(raw[SPLIT], 0))
    # vocabulary = train values by frequency (ties by value), nulls excluded
    counts = train.group_by("color").aggregate([("color", "count")]).to_pylist()
    expected = sorted((r for r in counts if r["color"] is not None), key=lambda r: (-r["color_count"], r["color"]))
    assert pp.vocab["color"].to_pylist() == [r["color"] for r in expected]
    logp = np.log1p(train["price"].to_numpy())
    assert pp.mean["price"] == pytest.approx(logp.mean()) and pp.std["price"] == pytest.approx(logp.std())
    # the cached encoded shards equal the transform called directly on the same rows
    enc = pq.read_table(os.path.join(res["encoded"], "split=train")).sort_by("user")
    key = content_key(pp.to_json())
    direct = encode_batch(train, key, pp.to_json())
    direct_t = pa.table({k: v for k, v in direct.items() if k != "split"}).sort_by("user")
    cols = pp.cat_columns + pp.num_columns + ["__label__"]
    for c in cols:
        assert sorted(enc[c].to_pylist()) == sorted(direct_t[c].to_pylist()), c
    assert enc.num_rows == res["profile"]["rows_by_split"]["train"]
    assert enc.schema.field("user").type == pa.int32() and enc.schema.field("price").type == pa.float32()
    # Ray Data map_batches calling the same function gives identical output
    via_ray = ray.data.from_arrow(train).map_batches(encode_batch, fn_args=(key, pp.to_json()),
                                                     batch_format="pyarrow", batch_size=None)
    got = pa.concat_tables(ray.get(via_ray.to_arrow_refs()))
    for c in cols:
        np.testing.assert_array_equal(got[c].to_numpy(), np.asarray(direct[c]))
    saved = Preprocessor.from_json(open(os.path.join(res["dir"], "preprocessor.json")).read())
    assert saved.to_json() == pp.to_json()
    prof = json.load(open(os.path.join(res["dir"], "profile.json")))
    assert prof["rows"] == 6000 and prof["features"]["color"]["nulls"] > 1000


def test_unseen_values_map_to_oov_after_fit(data_dir, tmp_path):
    cfg = _cfg(data_dir, tmp_path)
    cfg.features.features[0].min_count = 10**6  # every user below min_count -> OOV
    ds, schema = split_dataset(cfg)
    from training.prepare import fit_preprocessor

    pp = fit_preprocessor(compute_stats(ds, cfg), cfg, schema)
    assert len(pp.vocab["user"]) == 0
    assert set(pp.transform({c: small_table(50).column(c) for c in small_table(50).column_names})["user"]) == {OOV}


def _count_cfg(source: str, tmp_path, name: str = "user_seen", key: str = "user"):
    feats = {**SMALL_FEATURES, "features": SMALL_FEATURES["features"] + [
        {"name": name, "type": "numeric", "transform": "log1p", "count_by": key}]}
    return load_config(raw={"run": {"dir": str(tmp_path / "runs"), "name": "t"},
                            "data": {"source": source, "split": {"kind": "time"}}, "features": feats})


def test_count_feature_counts_each_keys_earlier_rows_over_all_splits(data_dir, tmp_path):
    ds, schema = split_dataset(_count_cfg(data_dir, tmp_path))
    t = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    assert t.num_rows == 6000 and "__count_key__" not in t.column_names
    assert schema.field("user_seen").type == pa.float64() and set(t[SPLIT].to_pylist()) == {0, 1, 2}
    df = t.select(["user", "ts", "user_seen"]).to_pandas()
    np.testing.assert_array_equal(df["user_seen"], df.groupby("user")["ts"].rank(method="min") - 1)
    with pytest.raises(DataError, match=r"'nope' \(count_by of feature 'user_seen'\)"):
        split_dataset(_count_cfg(data_dir, tmp_path, key="nope"))
    with pytest.raises(DataError, match=r"\['ts'\] already exist, but count_by features make them"):
        split_dataset(_count_cfg(data_dir, tmp_path, name="ts"))


@pytest.mark.parametrize("mutate, needle", [
    (lambda t: t.drop_columns(["price"]), "'price' (feature 'price')"),
    (lambda t: t.set_column(t.schema.get_field_index("clicked"), "clicked", pa.array(["yes"] * t.num_rows)),
     "label column 'clicked' has type string"),
    (lambda t: t.set_column(t.schema.get_field_index("clicked"), "clicked",
                            pa.array(np.where(np.arange(t.num_rows) == 5, 3, 0))), "label column 'clicked': 1 rows are not 0/1"),
    (lambda t: t.set_column(t.schema.get_field_index("price"), "price", pa.array(["x"] * t.num_rows)),
     "numeric feature 'price'"),
])
def test_schema_errors_name_the_column(tmp_path, mutate, needle):
    d = _write(mutate(small_table(500)), tmp_path / "bad", parts=1)
    cfg = _cfg(d, tmp_path)
    with pytest.raises(Exception) as e:
        ds, _ = split_dataset(cfg)
        compute_stats(ds, cfg)
    msg = str(e.value)
    assert needle in msg, msg


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        read_source(str(tmp_path / "nope"), _cfg("x", tmp_path))


def test_csv_and_parquet_read_the_same_rows(tmp_path):
    t = small_table(800)
    pq_rows = read_source(_write(t, tmp_path / "p", 2), _cfg("x", tmp_path)).to_pandas()
    csv_rows = read_source(_write(t, tmp_path / "c", 2, fmt="csv"), _cfg("x", tmp_path)).to_pandas()
    a, b = pq_rows.sort_values("ts").reset_index(drop=True), csv_rows.sort_values("ts").reset_index(drop=True)
    assert (a["user"] == b["user"]).all() and np.allclose(a["price"], b["price"])


def test_s3_reads_the_same_rows_as_local(s3_server, data_dir, tmp_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="logs")
    for name in sorted(os.listdir(data_dir)):
        s3.upload_file(os.path.join(data_dir, name), "logs", f"interactions/{name}")
    cfg = _cfg("s3://logs/interactions/", tmp_path, seed=7)
    cfg.data.s3.endpoint_url = s3_server
    cfg.run.dir = "s3://logs/runs"
    remote = _ids_by_split(split_dataset(cfg)[0])
    local = _ids_by_split(split_dataset(_cfg(data_dir, tmp_path, seed=7))[0])
    assert remote == local
    res = prepare(cfg)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="logs", Prefix="runs/t/data/")["Contents"]]
    assert "runs/t/data/preprocessor.json" in keys and any("split=train" in k for k in keys)
    assert res["profile"]["rows"] == 6000
