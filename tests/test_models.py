"""Model zoo: shapes, gradients, padding, learnability, arch round trip, config errors, bf16 autocast."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from training.config import ModelConfig
from training.models import (MODELS, CrossNetV2, DLRM, DotInteraction, FieldEmbedding, FieldSpec, FMInteraction,
                             LogReg, build_model, model_arch, model_from_arch)

FIELDS = [FieldSpec("u", 50, 1), FieldSpec("i", 30, 1), FieldSpec("g", 12, 4)]
N = 3
B = 32
NAMES = sorted(MODELS)
DEEP = [n for n in NAMES if n != "logreg"]


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny shapes gain nothing from intra-op threads, and on a busy box they slow down badly.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_cfg(name: str, **kw) -> ModelConfig:
    return ModelConfig(name=name, embedding_dim=8, mlp=[32, 16], cross_layers=2, **kw)


def batch(b: int = B, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(1, 50, (b, 1), generator=g)
    i = torch.randint(1, 30, (b, 1), generator=g)
    multi = torch.randint(1, 12, (b, 4), generator=g)
    lens = torch.randint(0, 5, (b,), generator=g)
    multi[torch.arange(4)[None, :] >= lens[:, None]] = 0  # ragged, some rows all padding
    return torch.cat([u, i, multi], dim=1), torch.randn(b, N, generator=g)


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    ranks = torch.empty_like(scores)
    ranks[scores.argsort()] = torch.arange(1, len(scores) + 1, dtype=scores.dtype)
    pos = labels.bool()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@pytest.mark.parametrize("name", NAMES)
def test_shape_finite_and_int32(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(small_cfg(name), FIELDS, N)
    x_cat, x_num = batch()
    out = model(x_cat, x_num)
    assert out.shape == (B,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(model(x_cat.int(), x_num), out)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_table(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(small_cfg(name), FIELDS, N)
    model(*batch()).pow(2).sum().backward()
    tables = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    assert len(tables) == len(FIELDS) * (2 if name in ("deepfm", "wide_deep", "dcnv2") else 1)  # + first order
    for t in tables:
        assert t.weight.grad is not None and t.weight.grad.abs().sum() > 0
        assert t.weight.grad[0].abs().sum() == 0  # padding row is never trained


@pytest.mark.parametrize("name", NAMES)
def test_padding_contributes_nothing(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(small_cfg(name), FIELDS, N).eval()
    x_cat, x_num = batch()
    before = model(x_cat, x_num)
    with torch.no_grad():
        for emb in (m for m in model.modules() if isinstance(m, FieldEmbedding)):
            emb.tables[2].weight[0].normal_(std=5.0)  # the multi-hot field's padding row
    torch.testing.assert_close(model(x_cat, x_num), before)


def test_multi_hot_mean_pooling() -> None:
    emb = FieldEmbedding([FieldSpec("g", 12, 4)], 5)
    x = torch.tensor([[3, 7, 0, 0], [0, 0, 0, 0], [2, 2, 9, 4]])
    out = emb(x)
    w = emb.tables[0].weight
    assert out.shape == (3, 1, 5)
    torch.testing.assert_close(out[0, 0], (w[3] + w[7]) / 2)
    torch.testing.assert_close(out[1, 0], torch.zeros(5))
    torch.testing.assert_close(out[2, 0], (2 * w[2] + w[9] + w[4]) / 4)


def test_parts_math() -> None:
    v = torch.randn(4, 3, 5)
    dots = DotInteraction(3)(v)
    assert dots.shape == (4, 3)
    torch.testing.assert_close(dots[:, 0], (v[:, 0] * v[:, 1]).sum(-1))
    torch.testing.assert_close(dots[:, 2], (v[:, 1] * v[:, 2]).sum(-1))
    pairs = sum((v[:, a] * v[:, b]).sum(-1) for a in range(3) for b in range(a + 1, 3))
    torch.testing.assert_close(FMInteraction()(v).squeeze(1), pairs)
    full, low = CrossNetV2(6, 2), CrossNetV2(6, 2, rank=2)
    assert full(torch.randn(4, 6)).shape == low(torch.randn(4, 6)).shape == (4, 6)
    assert sum(p.numel() for p in low.parameters()) < sum(p.numel() for p in full.parameters())


def _train_auc(name: str, x_cat: torch.Tensor, x_num: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    torch.manual_seed(0)
    model = build_model(small_cfg(name), FIELDS, N)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    loss_fn = nn.BCEWithLogitsLoss()
    first = loss_fn(model(x_cat, x_num), y).item()
    for _ in range(200):
        opt.zero_grad()
        loss = loss_fn(model(x_cat, x_num), y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return first, loss_fn(model(x_cat, x_num), y).item(), auc(model(x_cat, x_num), y)


def test_deep_models_learn_field_interaction() -> None:
    x_cat, x_num = batch(512, seed=1)
    y = (x_cat[:, 0] % 2 == x_cat[:, 1] % 2).float()  # XOR of two fields' parities: not additive
    results = {name: _train_auc(name, x_cat, x_num, y) for name in NAMES}
    for name in DEEP:
        first, last, a = results[name]
        assert last < 0.5 * first, (name, results[name])
        assert a > 0.9, (name, results[name])
        assert a > results["logreg"][2] + 0.15, (name, results)


@pytest.mark.parametrize("name", NAMES)
def test_arch_round_trip_via_safetensors(name: str, tmp_path) -> None:
    torch.manual_seed(0)
    cfg = small_cfg(name, cross_rank=3) if name == "dcnv2" else small_cfg(name)
    model = build_model(cfg, FIELDS, N).eval()
    arch = json.loads(json.dumps(model_arch(cfg, FIELDS, N)))
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    torch.manual_seed(1)
    loaded = model_from_arch(arch).eval()
    loaded.load_state_dict(load_file(tmp_path / "w.safetensors"), strict=True)
    x_cat, x_num = batch()
    assert torch.equal(loaded(x_cat, x_num), model(x_cat, x_num))
    assert type(loaded) is type(model) and arch["fields"][2] == {"name": "g", "cardinality": 12, "slots": 4}


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_returns_float32(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(small_cfg(name), FIELDS, N)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*batch())
        out.sum().backward()
    assert out.dtype == torch.float32 and out.shape == (B,) and torch.isfinite(out).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_bf16_autocast(name: str) -> None:
    model = build_model(small_cfg(name), FIELDS, N).cuda()
    x_cat, x_num = batch()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x_cat.cuda(), x_num.cuda())
        out.sum().backward()
    assert out.dtype == torch.float32 and out.shape == (B,) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_sparse_embeddings_with_sparse_adam(name: str) -> None:
    model = build_model(small_cfg(name), FIELDS, N, sparse=True)
    model(*batch()).sum().backward()
    sparse = [p for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()]
    assert sparse and all(p.grad.is_sparse for p in sparse)
    torch.optim.SparseAdam(sparse, lr=0.01).step()


@pytest.mark.parametrize("fields,n", [([], 3), ([FieldSpec("u", 50, 1), FieldSpec("g", 12, 4)], 0)])
@pytest.mark.parametrize("name", NAMES)
def test_only_numerics_or_only_categoricals(name: str, fields: list[FieldSpec], n: int) -> None:
    if name == "dlrm" and not fields:  # one dense vector has nothing to interact with: a clear error
        with pytest.raises(ValueError, match="(?i)dlrm"):
            build_model(small_cfg(name), fields, n)
        return
    model = build_model(small_cfg(name), fields, n)
    slots = sum(f.slots for f in fields)
    out = model(torch.ones(B, slots, dtype=torch.long), torch.randn(B, n))
    assert out.shape == (B,) and torch.isfinite(out).all()


def test_dcnv2_without_mlp_or_cross() -> None:
    for mlp, layers in [([], 2), ([16], 0), ([], 0)]:
        model = build_model(ModelConfig(name="dcnv2", mlp=mlp, cross_layers=layers, embedding_dim=4), FIELDS, N)
        assert model(*batch()).shape == (B,)


@pytest.mark.parametrize("make,match", [
    (lambda: build_model(ModelConfig(name="deepfm"), [], 0), "no inputs"),
    (lambda: build_model(ModelConfig(), [FieldSpec("u", 1, 1)], 3), r"field 'u' cardinality .* >= 2"),
    (lambda: build_model(ModelConfig(), [FieldSpec("u", 5, 0)], 3), r"field 'u' slots must be >= 1"),
    (lambda: build_model(ModelConfig(), [FieldSpec("u", 5), FieldSpec("u", 6)], 0), "duplicate field names"),
    (lambda: build_model(ModelConfig(name="deepfm", cross_rank=4), FIELDS, N), "cross_rank is only used by dcnv2"),
    (lambda: build_model(ModelConfig(cross_layers=0, cross_rank=4), FIELDS, N), "cross_layers == 0"),
    (lambda: build_model(ModelConfig(name="dlrm"), [FieldSpec("u", 5)], 0), "dlrm needs at least 2"),
    (lambda: build_model(ModelConfig.model_construct(name="wide_deep", embedding_dim=0, mlp=[8], dropout=0.0,
                                                     cross_layers=0, cross_rank=None), FIELDS, N),
     "embedding_dim must be >= 1"),
    (lambda: build_model(ModelConfig.model_construct(name="xgboost", cross_rank=None), FIELDS, N), "unknown model"),
    (lambda: DLRM(FIELDS, N, mlp=[8, 0]), r"mlp\[1\] must be >= 1"),
    (lambda: CrossNetV2(8, 2.0), "cross_layers must be an int"),  # type: ignore[arg-type]
    (lambda: model_from_arch({"name": "dcnv2"}), "missing keys"),
])
def test_build_errors_are_clear(make, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_dcnv2_first_order_adds_one_weight_per_value(tmp_path) -> None:
    """model.first_order (on by default): logreg's per-value weights added to dcnv2's logit."""
    assert build_model(small_cfg("dcnv2", first_order=False), FIELDS, N).linear is None
    cfg = small_cfg("dcnv2")
    model = build_model(cfg, FIELDS, N).eval()
    x_cat, x_num = batch()
    with torch.no_grad():
        before = model(x_cat, x_num)
        user = int(x_cat[0, 0])
        model.linear.weights.tables[0].weight[user] += 0.5  # the first field's weight for one user id
        after = model(x_cat, x_num)
    same = x_cat[:, 0] == user
    assert torch.allclose(after[same] - before[same], torch.full((int(same.sum()),), 0.5), atol=1e-5)
    assert torch.equal(after[~same], before[~same])
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    again = model_from_arch(json.loads(json.dumps(model_arch(cfg, FIELDS, N)))).eval()
    again.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    with torch.no_grad():
        assert torch.equal(again(x_cat, x_num), after)
    # an arch saved before the option existed rebuilds the model it described: no first-order part
    old = model_arch(small_cfg("dcnv2", first_order=False), FIELDS, N)
    del old["hparams"]["first_order"]
    assert model_from_arch(old).linear is None


def test_dcnv2_periodic_numeric_embedding(tmp_path) -> None:
    """model.numeric_embedding: periodic: each numeric also enters dcnv2 as a learned D-vector; the
    frequencies train, the arch round-trips, older archs (without the option) rebuild without it."""
    cfg = small_cfg("dcnv2", numeric_embedding="periodic")
    model = build_model(cfg, FIELDS, N)
    assert model.numeric.freq.shape == (N, 16) and model.cross.layers[0].in_features == (len(FIELDS) + N) * 8 + N
    x_cat, x_num = batch()
    model(x_cat, x_num).sum().backward()
    assert model.numeric.freq.grad.abs().sum() > 0 and model.numeric.weight.grad.abs().sum() > 0
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    again = model_from_arch(json.loads(json.dumps(model_arch(cfg, FIELDS, N)))).eval()
    again.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    with torch.no_grad():
        assert torch.equal(again(x_cat, x_num), model.eval()(x_cat, x_num))
    old = model_arch(small_cfg("dcnv2"), FIELDS, N)
    del old["hparams"]["numeric_embedding"]
    assert model_from_arch(old).numeric is None
    with pytest.raises(ValueError, match="numeric_embedding is only used by dcnv2"):
        build_model(small_cfg("deepfm", numeric_embedding="periodic"), FIELDS, N)


def test_forward_rejects_wrong_shapes() -> None:
    model = LogReg(FIELDS, N)
    x_cat, x_num = batch()
    with pytest.raises(ValueError, match=r"x_cat must be \[B, 6\]"):
        model(x_cat[:, :5], x_num)
    with pytest.raises(ValueError, match=r"x_num must be \[32, 3\]"):
        model(x_cat, x_num[:, :2])


def test_oov_dropout_trains_the_oov_rows_and_keeps_padding():
    from training.loop import oov_dropout

    torch.manual_seed(0)
    x = torch.randint(0, 50, (4096, 3))
    x[:, 0] = torch.randint(2, 50, (4096,))  # field u: known ids only
    assert torch.equal(oov_dropout(x, 0.0), x)
    out = oov_dropout(x, 0.2)
    changed = out != x
    assert torch.all(out[changed] == 1) and torch.all(x[changed] > 1)  # only known ids, only to OOV
    assert torch.equal(out[x <= 1], x[x <= 1])  # padding and OOV stay as they are
    assert 0.17 < changed[:, 0].float().mean() < 0.23
    for p in (0.0, 0.2):
        torch.manual_seed(1)
        model = build_model(small_cfg("dcnv2"), FIELDS, N)
        oov_row = model.embedding.tables[0].weight[1].detach().clone()
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        for step in range(20):
            x_cat, x_num = batch(seed=step)
            x_cat[:, 0] = x_cat[:, 0].clamp(min=2)
            loss = model(oov_dropout(x_cat, p), x_num).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        moved = not torch.equal(model.embedding.tables[0].weight[1], oov_row)
        assert moved == (p > 0), (p, moved)  # without dropout the OOV row keeps its random start
