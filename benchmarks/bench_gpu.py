"""The GPU path of the train step, without Ray: fp32 vs bf16 autocast, and where the batch comes from.

    python benchmarks/bench_gpu.py [--steps 200] [--batch 2048 16384]

For each model and batch size prints train-step samples/s with the batch (a) already on the device
(the limit), (b) copied from pinned host memory with non-blocking copies (what the train loop does
on a GPU: Collate pins, the loop copies with non_blocking=True), (c) copied from pageable host
memory. Fields are shaped like the demo data (two id tables of 25k and 10k rows, two multi-hot
fields, ten categorical, four numeric). Needs torch, pydantic and safetensors only (no Ray), so it
runs on a bare GPU box; on a machine without CUDA it runs on the CPU with few steps.
"""
from __future__ import annotations

import argparse
import time

import torch

from training.config import ModelConfig, TrainConfig
from training.models import FieldSpec, build_model

FIELDS = [FieldSpec("user_id", 25_002), FieldSpec("user_country", 32), FieldSpec("user_skills", 52, 5),
          FieldSpec("tier", 6), FieldSpec("job_id", 10_002), FieldSpec("job_category", 22),
          FieldSpec("job_skills", 52, 4), FieldSpec("client_country", 32), FieldSpec("hour", 26),
          FieldSpec("device", 5)]
NUM = 4


def host_batch(b: int, pinned: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(b)
    cols = [torch.randint(1, f.cardinality, (b, f.slots), generator=g) for f in FIELDS]
    out = {"x_cat": torch.cat(cols, 1), "x_num": torch.randn(b, NUM, generator=g),
           "y": (torch.rand(b, generator=g) < 0.2).float()}
    return {k: v.pin_memory() for k, v in out.items()} if pinned else out


def step_rate(name: str, b: int, steps: int, device: torch.device, bf16: bool, source: str) -> float:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name), FIELDS, NUM).to(device)
    t = TrainConfig()
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    batches = [host_batch(b + i, pinned=source == "pinned") for i in range(4)]
    if source == "device":
        batches = [{k: v.to(device) for k, v in x.items()} for x in batches]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    warm = max(3, steps // 10)
    for i in range(warm + steps):
        if i == warm:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        x = batches[i % len(batches)]
        x_cat, x_num, y = (x[k].to(device, non_blocking=source == "pinned") for k in ("x_cat", "x_num", "y"))
        with autocast:
            loss = loss_fn(model(x_cat, x_num), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * b / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, nargs="+", default=[2048, 16384])
    ap.add_argument("--models", nargs="+", default=["dcnv2", "dlrm", "deepfm", "wide_deep"])
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    steps = args.steps if cuda else min(args.steps, 10)
    sources = ["device", "pinned", "pageable"] if cuda else ["device"]
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name() if cuda else 'CPU'}; {steps} timed steps")
    print(f"{'model':10} {'batch':>6} {'precision':9} " + " ".join(f"{s + ' samples/s':>20}" for s in sources))
    for name in args.models:
        for b in args.batch:
            for bf16 in (False, True):
                rates = [step_rate(name, b, steps, device, bf16, s) for s in sources]
                print(f"{name:10} {b:6d} {'bf16' if bf16 else 'fp32':9} " + " ".join(f"{r:20,.0f}" for r in rates),
                      flush=True)


if __name__ == "__main__":
    main()
