"""Preprocessor and split logic without Ray: OOV, nulls, multi-hot, numerics, JSON round trip."""
import numpy as np
import pyarrow as pa
import pytest

from training.config import FeaturesConfig, load_config
from training.data import SPLIT, Splitter, earlier_counts
from training.features import FIRST, LABEL, OOV, PAD, DataError, Preprocessor, label_values

from tests.helpers import SMALL_FEATURES, small_table


def _pp() -> Preprocessor:
    spec = FeaturesConfig.model_validate(SMALL_FEATURES)
    return Preprocessor(spec, vocab={"user": pa.array([5, 7, 9], pa.int64()), "item": pa.array([1, 2], pa.int64()),
                                     "color": pa.array(["red", "blue"]), "tags": pa.array(["a", "b", "c"])},
                        mean={"price": 1.0}, std={"price": 2.0}, fill={"price": 1.0})


def test_transform_maps_unseen_and_null_to_oov():
    pp = _pp()
    out = pp.transform({"user": np.array([7, 5, 1234]), "item": [2, 3, 1], "color": ["blue", None, "mauve"],
                        "tags": ["a|c", None, "z|a|b|c|a|b"], "price": np.array([np.e - 1, np.nan, np.inf]),
                        "clicked": np.array([1, 0, 1])})
    assert out["user"].tolist() == [FIRST + 1, FIRST + 0, OOV]
    assert out["item"].tolist() == [FIRST + 1, OOV, FIRST + 0]
    assert out["color"].tolist() == [FIRST + 1, OOV, OOV]
    tags = np.stack([out[f"tags__{i}"] for i in range(4)], axis=1)
    assert tags.tolist() == [[FIRST + 0, FIRST + 2, PAD, PAD], [PAD] * 4, [OOV, FIRST + 0, FIRST + 1, FIRST + 2]]
    # log1p(e - 1) = 1 -> (1 - mean 1) / 2 = 0; nan and inf take the fill (the mean) -> 0
    assert np.allclose(out["price"], [0.0, 0.0, 0.0])
    assert out["user"].dtype == np.int32 and out["price"].dtype == np.float32
    assert out[LABEL].tolist() == [1.0, 0.0, 1.0]
    cat, num = pp.pack(out)
    assert cat.shape == (3, 3 + 4) and num.shape == (3, 1)
    assert pp.cardinality("user") == 5 and pp.cardinality("tags") == 5


def test_json_round_trip_gives_identical_output():
    pp = _pp()
    again = Preprocessor.from_json(pp.to_json())
    t = small_table(500)
    batch = {c: t.column(c) for c in t.column_names}
    a, b = pp.transform(batch), again.transform(batch)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert again.vocab["user"].type == pa.int64()


def test_inputs_as_numpy_lists_or_arrow_agree():
    pp = _pp()
    t = small_table(300)
    as_arrow = pp.transform({c: t.column(c) for c in t.column_names})
    as_numpy = pp.transform({c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names})
    as_lists = pp.transform({c: t.column(c).to_pylist() for c in t.column_names})
    for k in as_arrow:
        np.testing.assert_array_equal(as_arrow[k], as_numpy[k])
        np.testing.assert_array_equal(as_arrow[k], as_lists[k])


def test_hash_buckets_are_stable_and_in_range():
    spec = FeaturesConfig.model_validate({"label": "y", "features": [{"name": "u", "type": "categorical", "hash_buckets": 7}]})
    pp = Preprocessor(spec)
    a = pp.transform({"u": np.array(["x", "y", "x", None], dtype=object)})["u"]
    assert a[0] == a[2] and a[3] == OOV and ((a[:3] >= FIRST) & (a[:3] < FIRST + 7)).all()
    assert pp.cardinality("u") == FIRST + 7
    b = Preprocessor.from_json(pp.to_json()).transform({"u": np.array(["x", "y"], dtype=object)})["u"]
    assert b.tolist() == a[:2].tolist()


def test_label_errors_name_the_column():
    spec = FeaturesConfig.model_validate(SMALL_FEATURES)
    with pytest.raises(DataError, match="label column 'clicked': 1 rows are not 0/1"):
        label_values(spec, {"clicked": np.array([0, 1, 2])})
    with pytest.raises(DataError, match="'clicked'.*null"):
        label_values(spec, {"clicked": pa.array([0, None])})
    with pytest.raises(DataError, match="column 'price'"):
        _pp().transform({"user": [1], "item": [1], "color": ["red"], "tags": ["a"], "price": ["cheap"]})
    with pytest.raises(DataError, match="column 'tags'.*missing"):
        _pp().transform({"user": [1], "item": [1], "color": ["red"], "price": [1.0]})


def test_random_split_depends_on_content_not_order():
    t = small_table(3000)
    sp = Splitter("random", 0.1, 0.2, seed=3)
    a = sp.assign(t)
    perm = np.random.default_rng(0).permutation(t.num_rows)
    b = sp.assign(t.take(perm))
    np.testing.assert_array_equal(a[perm], b)
    rechunked = pa.concat_tables([t.slice(0, 1000), t.slice(1000)])
    np.testing.assert_array_equal(sp.assign(rechunked), a)
    frac = np.bincount(a, minlength=3) / len(a)
    assert abs(frac[1] - 0.1) < 0.03 and abs(frac[2] - 0.2) < 0.03
    assert not np.array_equal(Splitter("random", 0.1, 0.2, seed=4).assign(t), a)


def test_time_split_puts_the_future_in_test():
    t = small_table(1000)
    cut = (1_700_000_000 + 600 * 60, 1_700_000_000 + 800 * 60)
    s = Splitter("time", 0.2, 0.2, 0, time_col="ts", cutoffs=cut)(t)
    ts, split = t.column("ts").to_numpy(), s.column(SPLIT).to_numpy()
    assert ts[split == 0].max() < ts[split == 1].min() <= ts[split == 1].max() < ts[split == 2].min()


def test_earlier_counts_count_strictly_earlier_rows_of_the_same_key():
    rng = np.random.default_rng(3)
    key = pa.array(rng.choice(["a", "b", "c", None], 500).tolist())  # shuffled rows, ties in time, a null key
    t = rng.integers(0, 40, 500).astype(np.float64)
    got = earlier_counts(pa.chunked_array([key.slice(0, 200), key.slice(200)]), t)
    k = key.to_pylist()
    want = [np.nan if k[i] is None else sum(k[j] == k[i] and t[j] < t[i] for j in range(500)) for i in range(500)]
    np.testing.assert_array_equal(got, want)
    assert earlier_counts(pa.array(["x", "x", "x"]), np.array([5.0, 5.0, 1.0])).tolist() == [1, 1, 0]


def test_regex_derived_numeric():
    cfg = load_config("configs/movielens.yaml")
    year = next(f for f in cfg.features.features if f.name == "year")
    pp = Preprocessor(FeaturesConfig(label="y", features=[year]), mean={"year": 0.0}, std={"year": 1.0}, fill={"year": -1.0})
    out = pp.transform({"title": ["Heat (1995)", "Babylon 5", "Se7en (a.k.a. Seven) (1995) "]})
    assert out["year"].tolist() == [1995.0, -1.0, 1995.0]
