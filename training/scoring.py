"""The one scoring path: raw columns -> `Preprocessor.transform` -> `Preprocessor.pack` -> `forward`.

Training's evaluation (encoded splits, already transformed), the bundle's sample scores and self-check,
`rankray evaluate`, and serving all score through here; `forward` is the one place a model is run for
scores outside the training step. Shapes: B rows, S categorical slots, N numerics.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch

from training.features import Preprocessor
from training.models import FieldSpec

Autocast = Callable[[], AbstractContextManager]
def fields_of(pp: Preprocessor) -> list[FieldSpec]:
    """The model's categorical fields, as the preprocessor lays out their slots."""
    return [FieldSpec(f.name, pp.cardinality(f.name), len(pp.slots(f))) for f in pp.cat_features]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model: DDP (Ray Train's prepare_model) wraps it as `.module`."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def forward(model: torch.nn.Module, x_cat: np.ndarray | torch.Tensor, x_num: np.ndarray | torch.Tensor,
            autocast: Autocast = nullcontext, logits: bool = False) -> np.ndarray:
    """x_cat int [B, S], x_num float32 [B, N] (numpy or tensors, pinned ones copied without blocking) ->
    click probabilities float32 [B] as numpy (`logits`: the logits, float64), with the model in eval mode
    (its mode is restored after)."""
    m = unwrap(model)
    device = next(itertools.chain(m.parameters(), m.buffers())).device  # a GBDT has a buffer only
    x_cat = torch.as_tensor(x_cat).to(device, non_blocking=True)
    x_num = torch.as_tensor(x_num).to(device, non_blocking=True)
    was_training = m.training
    m.eval()
    try:
        with torch.inference_mode(), autocast():
            out = m(x_cat, x_num)  # [B] logits
    finally:
        m.train(was_training)
    return out.double().cpu().numpy() if logits else torch.sigmoid(out.float()).cpu().numpy()


def score_columns(pp: Preprocessor, model: torch.nn.Module,
                  columns: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Raw columns (lists, numpy or Arrow; multi-hot as lists or strings) -> (probabilities float32 [B],
    the encoded columns, for callers that count out-of-vocabulary ids or read the label)."""
    enc = pp.transform(columns)
    return forward(model, *pp.pack(enc)), enc


def score_rows(pp: Preprocessor, model: torch.nn.Module, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Click probabilities (float64) for raw rows (dicts by input column)."""
    if not rows:
        return np.zeros(0, np.float64)
    p, _ = score_columns(pp, model, {c: [r.get(c) for r in rows] for c in pp.input_columns})
    return p.astype(np.float64)
