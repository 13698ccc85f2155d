"""The training checkpoint format: model, best weights and optimizer state in safetensors, the loop's
state in JSON, and a manifest of checksums written last. Nothing is pickled; a checkpoint whose files
do not match its manifest (a writer or copy killed part way) is never loaded: the newest complete
older one of the run is taken instead."""
from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.fs as pafs
import ray.train
import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
REQUIRED_FILES = ("model.safetensors", "best.safetensors", "state.json")


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete or damaged (e.g. its writer or copy was killed mid-write)."""


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    best_auc: float = -math.inf
    best_epoch: float = -1.0
    bad_evals: int = 0  # evaluations in a row without a better valid AUC
    history: list[dict] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # epoch at each (re)start: shows resumes


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the (unwrapped) model's state."""
    m = model.module if hasattr(model, "module") else model
    # clone: on CPU .cpu() is the live parameter itself, and "best" must not follow later steps
    return {k: v.detach().cpu().clone().contiguous() for k, v in m.state_dict().items()}


def _flat_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflat_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(d: str, model: torch.nn.Module, best: dict[str, torch.Tensor], opts: list, state: TrainState,
                    arch: dict) -> None:
    save_file(weights_of(model), os.path.join(d, "model.safetensors"))
    save_file(best, os.path.join(d, "best.safetensors"))
    metas = []
    for i, opt in enumerate(opts):
        tensors, meta = _flat_optimizer(opt)
        save_file(tensors, os.path.join(d, f"optimizer{i}.safetensors"))
        metas.append(meta)
    with open(os.path.join(d, "state.json"), "w") as f:
        json.dump({"state": asdict(state), "optimizers": metas, "arch": arch}, f)
    write_manifest(d)  # last: a checkpoint without it, or whose files differ from it, is never loaded


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(d: str) -> None:
    files = {n: {"sha256": _sha256(os.path.join(d, n)), "bytes": os.path.getsize(os.path.join(d, n))}
             for n in sorted(os.listdir(d)) if n != MANIFEST and os.path.isfile(os.path.join(d, n))}
    with open(os.path.join(d, MANIFEST), "w") as f:
        json.dump({"files": files}, f, indent=1)


def verify_checkpoint(d: str) -> dict:
    """The checkpoint's manifest, once every file it lists is there with its size and sha256; else
    CheckpointError."""
    try:
        with open(os.path.join(d, MANIFEST)) as f:
            files = json.load(f)["files"]
    except FileNotFoundError:
        raise CheckpointError(f"no {MANIFEST}: incomplete checkpoint") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"unreadable {MANIFEST}: {e}") from None
    missing = [n for n in REQUIRED_FILES if n not in files]
    if missing:
        raise CheckpointError(f"{MANIFEST} lists no {', '.join(missing)}")
    for name, want in files.items():
        path = os.path.join(d, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{name}: missing")
        if os.path.getsize(path) != want["bytes"] or _sha256(path) != want["sha256"]:
            raise CheckpointError(f"{name}: checksum mismatch")
    return files


def load_checkpoint(d: str, model: torch.nn.Module, opts: list,
                    arch: dict) -> tuple[TrainState, dict[str, torch.Tensor]]:
    verify_checkpoint(d)  # before anything is loaded: a refused checkpoint leaves model and optimizers as they were
    with open(os.path.join(d, "state.json")) as f:
        meta = json.load(f)
    if meta["arch"] != arch:
        raise ValueError("the run's checkpoint holds a different model architecture than the config asks for; "
                         "use a new run.name (or delete the old run) to train this model")
    model.load_state_dict(load_file(os.path.join(d, "model.safetensors")))
    for i, opt in enumerate(opts):
        opt.load_state_dict(_unflat_optimizer(load_file(os.path.join(d, f"optimizer{i}.safetensors")),
                                              meta["optimizers"][i]))
    state = meta["state"]
    state["bad_evals"] = state.pop("bad_epochs", state.get("bad_evals", 0))  # the name before 2026-12
    return TrainState(**state), load_file(os.path.join(d, "best.safetensors"))


def best_weights(checkpoint: ray.train.Checkpoint) -> dict[str, torch.Tensor]:
    """The best-validation weights a checkpoint holds (after its manifest check)."""
    with checkpoint.as_directory() as d:
        verify_checkpoint(d)
        return load_file(os.path.join(d, "best.safetensors"))


def _older_checkpoints(ckpt: ray.train.Checkpoint) -> list[ray.train.Checkpoint]:
    """The run's other checkpoint directories older than `ckpt`, newest first (names are timestamps)."""
    fs, parent, name = ckpt.filesystem, posixpath.dirname(ckpt.path), posixpath.basename(ckpt.path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
    except OSError:
        return []
    names = sorted((posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory), reverse=True)
    return [ray.train.Checkpoint(path=posixpath.join(parent, n), filesystem=fs)
            for n in names if n.startswith("checkpoint_") and n < name]


def restore(ckpt: ray.train.Checkpoint, model: torch.nn.Module, opts: list,
            arch: dict) -> tuple[TrainState, dict[str, torch.Tensor], str, list[str]]:
    """Load the checkpoint Ray hands over or, when its files do not match its manifest (a write or copy
    killed part way), the newest older complete one of the run. Returns (state, best weights, the
    checkpoint's name, the refused ones with reasons)."""
    refused = []
    for cand in [ckpt, *_older_checkpoints(ckpt)]:
        name = posixpath.basename(cand.path)
        try:
            with cand.as_directory() as d:
                state, best = load_checkpoint(d, model, opts, arch)
            return state, best, name, refused
        except CheckpointError as e:
            refused.append(f"{name}: {e}")
    raise CheckpointError("no complete checkpoint to resume from (delete the run or use a new run.name): "
                          + "; ".join(refused))
