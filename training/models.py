"""CTR ranking models: DCNv2, DLRM, DeepFM, Wide&Deep, LogReg built from shared named parts, and a LightGBM
booster (GBDT) behind the same interface.

Shapes: B batch, S categorical slots, F fields, D embedding dim, N numerics, K = F*D + N.
Every model maps (x_cat int64 [B, S], x_num float32 [B, N]) to logits float32 [B] (no sigmoid).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from training.config import ModelConfig

ARCH_VERSION = 1


@dataclass(frozen=True)
class FieldSpec:
    """A categorical field over `slots` consecutive columns of x_cat (slots > 1: multi-hot, 0-padded)."""

    name: str
    cardinality: int  # table rows, including 0 = padding and 1 = out-of-vocabulary
    slots: int = 1

    def __post_init__(self) -> None:
        _check_int(f"field {self.name!r} cardinality (0 = padding, 1 = out-of-vocabulary)", self.cardinality, 2)
        _check_int(f"field {self.name!r} slots", self.slots, 1)


def _check_int(what: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{what} must be >= {low}, got {value}")


def _check_inputs(fields: Sequence[FieldSpec], num_numeric: int) -> None:
    _check_int("num_numeric", num_numeric, 0)
    if not fields and num_numeric == 0:
        raise ValueError("the model has no inputs: no categorical fields and num_numeric == 0")
    if not all(isinstance(f, FieldSpec) for f in fields):
        raise TypeError(f"fields must be FieldSpec instances, got {[type(f).__name__ for f in fields]}")
    names = [f.name for f in fields]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate field names: {sorted({n for n in names if names.count(n) > 1})}")


def _check_hparams(embedding_dim: int, mlp: Sequence[int], dropout: float) -> None:
    _check_int("embedding_dim", embedding_dim, 1)
    for i, h in enumerate(mlp):
        _check_int(f"mlp[{i}]", h, 1)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


class FieldEmbedding(nn.Module):
    """Sparse part: x_cat [B, S] -> [B, F, D]; one table per field, multi-hot fields mean-pooled.

    Padding (index 0) is masked out of the mean, so its row never matters; all-padding rows pool
    to zeros. Masked mean over nn.Embedding was timed faster than EmbeddingBag(sum, per_sample_weights)
    at B=4096, L=8 on CPU for inference and sparse-gradient training, and about equal for dense.
    """

    def __init__(self, fields: Sequence[FieldSpec], dim: int, sparse: bool = False, init_std: float = 0.03) -> None:
        super().__init__()
        self.dim = dim
        self.slots = [f.slots for f in fields]
        self.tables = nn.ModuleList(nn.Embedding(f.cardinality, dim, padding_idx=0, sparse=sparse) for f in fields)
        for t in self.tables:
            # Small, so interactions start near zero, but not tiny: at 0.01 the cross/MLP gradients
            # reaching rare rows were too weak to learn in one epoch (demo test AUC 0.725 vs 0.729
            # at 0.03); 0.1 helped the 1M-row demo a little more but overfit small MovieLens.
            nn.init.normal_(t.weight, std=init_std)
            with torch.no_grad():
                t.weight[0].zero_()

    def forward(self, x_cat: Tensor) -> Tensor:
        out, start = [], 0
        for table, n in zip(self.tables, self.slots):
            if n == 1:
                out.append(table(x_cat[:, start]))
            else:
                idx = x_cat[:, start:start + n]
                emb = table(idx)  # [B, L, D]
                mask = (idx != 0).unsqueeze(-1).to(emb.dtype)
                out.append((emb * mask).sum(1) / mask.sum(1).clamp(min=1.0))
            start += n
        if not out:
            return x_cat.new_zeros((x_cat.shape[0], 0, self.dim), dtype=torch.float32)
        return torch.stack(out, dim=1)


class DenseProjection(nn.Module):
    """Numerics [B, N] -> [B, D] "dense field": an MLP over `hidden`, then a linear map to D."""

    def __init__(self, num_numeric: int, dim: int, hidden: Sequence[int] = ()) -> None:
        super().__init__()
        self.body = MLP(num_numeric, hidden)
        self.out = nn.Linear(self.body.out_dim, dim)

    def forward(self, x_num: Tensor) -> Tensor:
        return self.out(self.body(x_num))


class PeriodicEmbedding(nn.Module):
    """Numerics [B, N] -> [B, N, D]: per feature, ReLU(W_n [cos 2πcx, sin 2πcx] + b_n) with K learned
    frequencies c per feature (the "PLR" numeric embedding of Gorishniy et al. 2022): a smooth,
    many-sided view of a number that an MLP or a cross net reads better than the scalar alone. The initial
    frequencies' scale sigma (on z-scored inputs), measured as dcnv2's test AUC gain on configs/real/adult.yaml
    (2 seeds): 0.1 +0.003, 1 +0.005, 3 +0.011, 10 +0.014; on MovieLens 3 -0.012, 10 -0.015."""

    def __init__(self, num_numeric: int, dim: int, k: int = 16, sigma: float = 3.0) -> None:
        super().__init__()
        self.freq = nn.Parameter(torch.randn(num_numeric, k) * sigma)
        bound = 1 / math.sqrt(2 * k)
        self.weight = nn.Parameter(torch.empty(num_numeric, 2 * k, dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(num_numeric, dim))

    def forward(self, x_num: Tensor) -> Tensor:
        z = 2 * math.pi * self.freq.unsqueeze(0) * x_num.unsqueeze(-1)  # [B, N, K]
        z = torch.cat([torch.cos(z), torch.sin(z)], dim=-1)  # [B, N, 2K]
        return torch.relu(torch.einsum("bnk,nkd->bnd", z, self.weight) + self.bias)


class CrossNetV2(nn.Module):
    """[B, K] -> [B, K]: x_{l+1} = x0 * (W x_l + b) + x_l, with W = U V^T (rank r) when rank is set."""

    def __init__(self, dim: int, layers: int, rank: int | None = None) -> None:
        super().__init__()
        _check_int("cross_layers", layers, 0)
        if rank is not None:
            _check_int("cross_rank", rank, 1)
        self.layers = nn.ModuleList(
            nn.Linear(dim, dim) if rank is None
            else nn.Sequential(nn.Linear(dim, rank, bias=False), nn.Linear(rank, dim))  # W = U V^T
            for _ in range(layers)
        )

    def forward(self, x0: Tensor) -> Tensor:
        x = x0
        for w in self.layers:
            x = x0 * w(x) + x
        return x


class DotInteraction(nn.Module):
    """DLRM: [B, F, D] -> [B, F(F-1)/2], dot products of every field pair (upper triangle)."""

    def __init__(self, num_fields: int) -> None:
        super().__init__()
        iu = torch.triu_indices(num_fields, num_fields, offset=1)
        # Not persistent: derived from the arch, so it stays out of the saved weights.
        self.register_buffer("rows", iu[0], persistent=False)
        self.register_buffer("cols", iu[1], persistent=False)

    def forward(self, v: Tensor) -> Tensor:
        return torch.bmm(v, v.transpose(1, 2))[:, self.rows, self.cols]


class FMInteraction(nn.Module):
    """DeepFM 2nd order: [B, F, D] -> [B, 1] = sum_D 0.5 * ((sum_F v)^2 - sum_F v^2)."""

    def forward(self, v: Tensor) -> Tensor:
        return 0.5 * (v.sum(1).pow(2) - v.pow(2).sum(1)).sum(1, keepdim=True)


class MLP(nn.Module):
    """[B, in] -> [B, hidden[-1]] (identity when hidden is empty): Linear + ReLU (+ Dropout) per layer."""

    def __init__(self, in_dim: int, hidden: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(in_dim, h), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout > 0 else [])
            in_dim = h
        self.net = nn.Sequential(*layers)
        self.out_dim = in_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Linear(nn.Module):
    """First-order part: (x_cat [B, S], x_num [B, N]) -> [B, 1] = bias + sum_F w_field + w . x_num.

    Field weights are 1-dim embeddings, so a multi-hot field contributes the mean weight of its items.
    """

    def __init__(self, fields: Sequence[FieldSpec], num_numeric: int, sparse: bool = False) -> None:
        super().__init__()
        self.weights = FieldEmbedding(fields, 1, sparse=sparse)
        self.numeric = nn.Linear(num_numeric, 1, bias=False) if num_numeric else None
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x_cat: Tensor, x_num: Tensor) -> Tensor:
        out = self.weights(x_cat).sum(1) + self.bias  # [B, 1]
        return out + self.numeric(x_num) if self.numeric is not None else out


class _Ranker(nn.Module):
    """Shared input checks and casts; subclasses implement `_logits(x_cat, x_num) -> [B] or [B, 1]`."""

    def __init__(self, fields: Sequence[FieldSpec], num_numeric: int) -> None:
        super().__init__()
        _check_inputs(fields, num_numeric)
        self.fields = list(fields)
        self.num_numeric = num_numeric
        self.num_slots = sum(f.slots for f in fields)

    def forward(self, x_cat: Tensor, x_num: Tensor) -> Tensor:
        if x_cat.dim() != 2 or x_cat.shape[1] != self.num_slots:
            raise ValueError(f"x_cat must be [B, {self.num_slots}], got {list(x_cat.shape)}")
        if x_num.dim() != 2 or x_num.shape[1] != self.num_numeric or x_num.shape[0] != x_cat.shape[0]:
            raise ValueError(f"x_num must be [{x_cat.shape[0]}, {self.num_numeric}], got {list(x_num.shape)}")
        # Logits leave in float32 even under bf16 autocast: losses and metrics expect it.
        return self._logits(x_cat.long(), x_num.float()).reshape(-1).float()

    def _logits(self, x_cat: Tensor, x_num: Tensor) -> Tensor:
        raise NotImplementedError


class DCNv2(_Ranker):
    """DCN-V2, parallel: x0 = [flat emb [B, F*D], x_num [B, N] (, periodic numeric emb [B, N*D])] ->
    concat(CrossNetV2, MLP) -> head -> [B]."""

    def __init__(self, fields: Sequence[FieldSpec], num_numeric: int, embedding_dim: int = 16,
                 mlp: Sequence[int] = (256, 128), cross_layers: int = 3, cross_rank: int | None = None,
                 dropout: float = 0.0, sparse: bool = False, first_order: bool = True,
                 numeric_embedding: str = "none") -> None:
        super().__init__(fields, num_numeric)
        _check_hparams(embedding_dim, mlp, dropout)
        self.linear = Linear(fields, num_numeric, sparse=sparse) if first_order else None
        if cross_rank is not None and cross_layers == 0:
            raise ValueError("cross_rank is set but cross_layers == 0: there is no cross net to make low-rank")
        self.embedding = FieldEmbedding(fields, embedding_dim, sparse=sparse)
        self.numeric = PeriodicEmbedding(num_numeric, embedding_dim) \
            if numeric_embedding == "periodic" and num_numeric else None
        k = (len(fields) + (num_numeric if self.numeric is not None else 0)) * embedding_dim + num_numeric
        self.cross = CrossNetV2(k, cross_layers, cross_rank)
        self.mlp = MLP(k, mlp, dropout)
        self.use_mlp = len(mlp) > 0
        # With neither part the 0-layer cross net (identity) feeds x0 to the head: a linear model.
        self.use_cross = cross_layers > 0 or not self.use_mlp
        self.head = nn.Linear((k if self.use_cross else 0) + (self.mlp.out_dim if self.use_mlp else 0), 1)

    def _logits(self, x_cat: Tensor, x_num: Tensor) -> Tensor:
        inputs = [self.embedding(x_cat).flatten(1), x_num]
        if self.numeric is not None:
            inputs.append(self.numeric(x_num).flatten(1).to(inputs[0].dtype))
        x0 = torch.cat(inputs, dim=1)
        parts = ([self.cross(x0)] if self.use_cross else []) + ([self.mlp(x0)] if self.use_mlp else [])
        out = self.head(torch.cat(parts, dim=1))
        return out + self.linear(x_cat, x_num) if self.linear is not None else out


class DLRM(_Ranker):
    """DLRM: x_num -> bottom [B, D], one more field; DotInteraction over [B, F(+1), D] -> [B, P];
    [bottom [B, D], dots [B, P]] -> top MLP -> head -> [B]. Without numerics the top sees only dots."""

    def __init__(self, fields: Sequence[FieldSpec], num_numeric: int, embedding_dim: int = 16,
                 mlp: Sequence[int] = (256, 128), dropout: float = 0.0, sparse: bool = False,
                 bottom_mlp: Sequence[int] = ()) -> None:
        super().__init__(fields, num_numeric)
        _check_hparams(embedding_dim, mlp, dropout)
        n_vec = len(fields) + (1 if num_numeric else 0)
        if n_vec < 2:
            raise ValueError("dlrm needs at least 2 interacting vectors (categorical fields + 1 if numerics), "
                             f"got {n_vec}")
        self.embedding = FieldEmbedding(fields, embedding_dim, sparse=sparse)
        self.bottom = DenseProjection(num_numeric, embedding_dim, bottom_mlp) if num_numeric else None
        self.interaction = DotInteraction(n_vec)
        self.top = MLP(n_vec * (n_vec - 1) // 2 + (embedding_dim if num_numeric else 0), mlp, dropout)
        self.head = nn.Linear(self.top.out_dim, 1)

    def _logits(self, x_cat: Tensor, x_num: Tensor) -> Tensor:
        v = self.embedding(x_cat)
        if self.bottom is None:
            return self.head(self.top(self.interaction(v)))
        dense = self.bottom(x_num)
        v = torch.cat([dense.unsqueeze(1).to(v.dtype), v], dim=1)
        return self.head(self.top(torch.cat([dense, self.interaction(v)], dim=1)))


class WideDeep(_Ranker):
    """Wide & Deep: Linear [B, 1] + head(MLP([flat emb [B, F*D], x_num])) -> [B]."""

    def __init__(self, fields: Sequence[FieldSpec], num_numeric: int, embedding_dim: int = 16,
                 mlp: Sequence[int] = (256, 128), dropout: float = 0.0, sparse: bool = False) -> None:
        super().__init__(fields, num_numeric)
        _check_hparams(embedding_dim, mlp, dropout)
        self.linear = Linear(fields, num_numeric, sparse=sparse)
        self.embedding = FieldEmbedding(fields, embedding_dim, sparse=sparse)
        self.mlp = MLP(len(fields) * embedding_dim + num_numeric, mlp, dropout)
        self.head = nn.Linear(self.mlp.out_dim, 1)

    def _logits(self, x_cat: Tensor, x_num: Tensor) -> Tensor:
        deep = self.head(self.mlp(torch.cat([self.embedding(x_cat).flatten(1), x_num], dim=1)))
        return self.linear(x_cat, x_num) + deep


class DeepFM(WideDeep):
    """DeepFM: Wide & Deep + FMInteraction over [B, F (+1 dense field if N > 0), D] -> [B].

    The FM and the MLP share the field embeddings, as in the paper.
    """

    def __init__(self, fields: Sequence[FieldSpec], num_numeric: int, embedding_dim: int = 16,
                 mlp: Sequence[int] = (256, 128), dropout: float = 0.0, sparse: bool = False) -> None:
        super().__init__(fields, num_numeric, embedding_dim, mlp, dropout, sparse)
        self.dense = DenseProjection(num_numeric, embedding_dim) if num_numeric else None
        self.fm = FMInteraction()

    def _logits(self, x_cat: Tensor, x_num: Tensor) -> Tensor:
        v = self.embedding(x_cat)
        deep = self.head(self.mlp(torch.cat([v.flatten(1), x_num], dim=1)))
        if self.dense is not None:
            v = torch.cat([v, self.dense(x_num).unsqueeze(1).to(v.dtype)], dim=1)
        return self.linear(x_cat, x_num) + self.fm(v) + deep


class LogReg(_Ranker):
    """Logistic regression: Linear -> [B] (per-field weights, numeric weights, bias)."""

    def __init__(self, fields: Sequence[FieldSpec], num_numeric: int, sparse: bool = False) -> None:
        super().__init__(fields, num_numeric)
        self.linear = Linear(fields, num_numeric, sparse=sparse)

    def _logits(self, x_cat: Tensor, x_num: Tensor) -> Tensor:
        return self.linear(x_cat, x_num)


class GBDT(_Ranker):
    """A LightGBM booster behind the same interface, so it is scored, bundled and served like the deep models
    (training.scoring.forward). Its state is LightGBM's own text model format as a uint8 tensor
    (`model_text`, in weights.safetensors: no pickle); the categorical slots are its native categoricals
    (one column per slot, ids as the encoder gives them; a bag of a multi-hot field's most frequent values
    instead measured no better: docs/benchmark-notes.md), the numerics as they are. Trained by
    training.gbdt, not by gradient steps: `fields`/`num_numeric` fix the input layout only."""

    def __init__(self, fields: Sequence[FieldSpec], num_numeric: int) -> None:
        super().__init__(fields, num_numeric)
        self.register_buffer("model_text", torch.zeros(0, dtype=torch.uint8))
        self._booster: Any = None

    def set_booster_text(self, text: str) -> None:
        import lightgbm

        self.model_text = torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)
        self._booster = lightgbm.Booster(model_str=text)

    @property
    def trees(self) -> int:
        return self._booster.current_iteration()

    def _load_from_state_dict(self, state: Any, prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        # the booster is rebuilt from the text (the zero-length buffer cannot take a copy): alone or in a Blend
        key = prefix + "model_text"
        if key not in state:
            missing_keys.append(key)
            return
        self.set_booster_text(state[key].cpu().numpy().tobytes().decode())

    @staticmethod
    def features(x_cat: Any, x_num: Any) -> Any:
        """[B, S + N] float64: the slots' ids, then the numerics (LightGBM's input)."""
        x_cat, x_num = (x.cpu().numpy() if isinstance(x, Tensor) else x for x in (x_cat, x_num))
        return np.concatenate([np.asarray(x_cat, np.float64), np.asarray(x_num, np.float64)], axis=1)

    def _logits(self, x_cat: Tensor, x_num: Tensor) -> Tensor:
        if self._booster is None:
            raise ValueError("the GBDT model is not trained (no booster loaded)")
        raw = self._booster.predict(self.features(x_cat, x_num), raw_score=True)
        return torch.as_tensor(raw, dtype=torch.float32, device=x_cat.device)


class Blend(nn.Module):
    """The search's winner when mixing helps: logits = sum_i w_i * logit_i over its parts (trials of any
    family), the weights chosen on the validation split (tune.search.select_ensemble, kept by blend_wins)."""

    def __init__(self, parts: Sequence[nn.Module], weights: Sequence[float]) -> None:
        super().__init__()
        if len(parts) != len(weights) or len(parts) < 2:
            raise ValueError(f"a blend needs two or more parts, one weight each; got {len(parts)} and {len(weights)}")
        self.parts = nn.ModuleList(parts)
        self.register_buffer("weights", torch.tensor(list(weights), dtype=torch.float32))

    def forward(self, x_cat: Tensor, x_num: Tensor) -> Tensor:
        return sum(w * m(x_cat, x_num) for w, m in zip(self.weights.tolist(), self.parts))


def blend_arch(parts: Sequence[dict[str, Any]], weights: Sequence[float]) -> dict[str, Any]:
    """The arch of a Blend: its parts' archs (same input layout) and weights."""
    return {"version": ARCH_VERSION, "name": "blend", "parts": list(parts), "weights": [float(w) for w in weights],
            "fields": parts[0]["fields"], "num_numeric": parts[0]["num_numeric"]}


def model_label(arch: dict[str, Any]) -> str:
    """`dcnv2`, or `blend(lightgbm 0.62 + dcnv2 0.38)`."""
    if arch.get("name") != "blend":
        return str(arch.get("name"))
    return "blend(" + " + ".join(f"{p['name']} {w:.2f}" for p, w in zip(arch["parts"], arch["weights"])) + ")"


# the models trained by gradient steps (the training loop); "lightgbm" (GBDT) is fitted by training.gbdt
MODELS: dict[str, type[_Ranker]] = {"dcnv2": DCNv2, "dlrm": DLRM, "deepfm": DeepFM, "wide_deep": WideDeep,
                                    "logreg": LogReg}


def build_model(cfg: ModelConfig, fields: Sequence[FieldSpec], num_numeric: int, sparse: bool = False) -> nn.Module:
    """The model named by cfg.name; `sparse=True` gives sparse embedding gradients (SparseAdam/Adagrad)."""
    if cfg.name == "lightgbm":
        return GBDT(fields, num_numeric)
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model {cfg.name!r}; choose one of {sorted(MODELS) + ['lightgbm']}")
    if cfg.cross_rank is not None and cfg.name != "dcnv2":
        raise ValueError(f"model.cross_rank is only used by dcnv2, not {cfg.name!r}; unset it")
    if cfg.numeric_embedding != "none" and cfg.name != "dcnv2":
        raise ValueError(f"model.numeric_embedding is only used by dcnv2, not {cfg.name!r}; unset it")
    if cfg.name == "logreg":
        return LogReg(fields, num_numeric, sparse=sparse)
    kw: dict[str, Any] = dict(embedding_dim=cfg.embedding_dim, mlp=list(cfg.mlp), dropout=cfg.dropout, sparse=sparse)
    if cfg.name == "dcnv2":
        kw.update(cross_layers=cfg.cross_layers, cross_rank=cfg.cross_rank, first_order=cfg.first_order,
                  numeric_embedding=cfg.numeric_embedding)
    return MODELS[cfg.name](fields, num_numeric, **kw)


def model_arch(cfg: ModelConfig, fields: Sequence[FieldSpec], num_numeric: int) -> dict[str, Any]:
    """JSON-serializable description that `model_from_arch` turns back into the same model."""
    return {"version": ARCH_VERSION, "name": cfg.name, "hparams": cfg.model_dump(mode="json"),
            "fields": [dataclasses.asdict(f) for f in fields], "num_numeric": num_numeric}


def model_from_arch(arch: dict[str, Any], sparse: bool = False) -> nn.Module:
    """Rebuild the (untrained) model described by `model_arch`; then load its state dict."""
    if arch.get("name") == "blend":
        return Blend([model_from_arch(p, sparse) for p in arch["parts"]], arch["weights"])
    missing = [k for k in ("version", "hparams", "fields", "num_numeric") if k not in arch]
    if missing:
        raise ValueError(f"model arch is missing keys {missing}")
    if arch["version"] != ARCH_VERSION:
        raise ValueError(f"model arch version {arch['version']} is not supported (expected {ARCH_VERSION})")
    fields = [FieldSpec(**f) for f in arch["fields"]]
    # bundles written before model.first_order / numeric_embedding existed hold a dcnv2 without them
    hparams = {"first_order": False, "numeric_embedding": "none", **arch["hparams"]}
    return build_model(ModelConfig(**hparams), fields, int(arch["num_numeric"]), sparse=sparse)
