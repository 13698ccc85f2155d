"""`rankray score`: batch inference of a bundle over Parquet rows (a file, directory or glob; local or
s3://), written as Parquet: every row with its score, or the top K rows of each group with their rank.

How it runs: the input files are split among a pool of scorer actors (one per CPU the cluster has, or one
per GPU on a GPU cluster, with the model on it). Each actor loads and self-checks the bundle once, as a
Serve replica does (`verify_samples`), then streams its files: a batch of rows is read, scored through the
bundle's own transform (`training.scoring.score_columns`, the serving path) and written out, so memory is a
batch per actor and nothing but a row count per file comes back to the driver. Each input file gives one
output file, written under a temporary name and renamed when complete (on S3 an object appears whole when
its upload completes): a run that stopped is resumed by running it again, and the files already written
are not scored again. With `--top-k`, the per-file scores go to DST/_scores/ (resumable the same way) and
Ray Data groups them by the group column (a shuffle: no group is gathered on the driver) and writes the
best K of each group, ranked 1..K, to DST.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from training import console, storage
from training.bundle import load_bundle, verify_samples
from training.features import DataError
from training.scoring import score_columns

SCORE, RANK = "score", "rank"
SCORES_DIR = "_scores"  # per-file scores under DST when the output is the top K per group


def output_name(src_root: str, path: str) -> str:
    """The output file of input `path`: its name and a hash of its place under the input root, so two inputs
    never share one and a rerun finds it again."""
    rel = posixpath.relpath(path, src_root) if path != src_root else posixpath.basename(path)
    stem = posixpath.basename(path).rsplit(".", 1)[0]
    return f"{stem}-{hashlib.sha1(rel.encode()).hexdigest()[:10]}.parquet"


def check_inputs(files: list[str], fs: Any, needed: list[str], keep: list[str], where: str) -> None:
    """Every input file has the columns the bundle scores and the `keep` ones (the group among them): checked
    on the footers before any row is read; the error names the file and the columns."""
    for c in (SCORE, RANK):
        if c in keep:
            raise DataError(f"{where}: input column {c!r} would be overwritten by the output's own {c!r}; "
                            f"leave it out of --keep")
    for f in files:
        try:
            schema = pq.read_schema(fs.open_input_file(f))
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(f"{where}: {f}: not a readable Parquet file ({e})") from None
        missing = [c for c in dict.fromkeys(needed + keep) if c not in schema.names]
        if missing:
            raise DataError(f"{where}: {f} has no column {', '.join(map(repr, missing))} "
                            f"(the bundle scores {needed}; it has {schema.names})")


@ray.remote
class Scorer:
    """One bundle, loaded and self-checked once; scores whole files, a batch at a time."""

    def __init__(self, bundle: str, s3: storage.S3Options, device: str) -> None:
        import torch

        torch.set_num_threads(1)
        self.pp, self.model, meta = load_bundle(bundle, s3)
        verify_samples(self.pp, self.model, meta)  # the same start-up check as a Serve replica
        self.model.to(device)
        self.s3 = s3

    def score_file(self, src: str, dst: str, keep: list[str], batch_size: int) -> dict[str, Any]:
        t0 = time.time()
        fs_in, p_in = storage.filesystem(src, self.s3)
        fs_out, out = storage.filesystem(dst, self.s3)
        fs_out.create_dir(posixpath.dirname(out), recursive=True)
        tmp = out if storage.is_s3(dst) else storage.temp_sibling(out)  # S3: the object appears when complete
        needed = self.pp.input_columns
        pf = pq.ParquetFile(fs_in.open_input_file(p_in))
        rows, writer = 0, None
        try:
            with fs_out.open_output_stream(tmp) as sink:
                for batch in pf.iter_batches(batch_size=batch_size, columns=list(dict.fromkeys(needed + keep))):
                    t = pa.Table.from_batches([batch])
                    try:
                        p, _ = score_columns(self.pp, self.model, {c: t.column(c) for c in needed})
                    except (DataError, ValueError, TypeError) as e:
                        raise DataError(f"{src}: rows {rows:,}-{rows + t.num_rows - 1:,}: {e}") from None
                    part = t.select(keep).append_column(SCORE, pa.array(np.asarray(p, np.float32)))
                    writer = writer or pq.ParquetWriter(sink, part.schema)
                    writer.write_table(part)
                    rows += t.num_rows
                if writer is None:  # no rows: an empty file with the output's columns
                    schema = pa.schema([pf.schema_arrow.field(c) for c in keep]).append(pa.field(SCORE, pa.float32()))
                    writer = pq.ParquetWriter(sink, schema)
                writer.close()
            if tmp != out:
                fs_out.move(tmp, out)
        except BaseException:
            if tmp != out and fs_out.get_file_info(tmp).type != storage.pafs.FileType.NotFound:
                fs_out.delete_file(tmp)
            raise
        return {"file": src, "rows": rows, "seconds": time.time() - t0}


def _top_k(t: pa.Table, k: int) -> pa.Table:
    idx = pc.sort_indices(t, sort_keys=[(SCORE, "descending")])[:k]
    top = t.take(idx)
    return top.append_column(RANK, pa.array(np.arange(1, top.num_rows + 1, dtype=np.int32)))


def scorer_count(resources: dict[str, float], files: int) -> tuple[int, str]:
    """(actors, device): one per GPU when the cluster has GPUs, else one per CPU; never more than files."""
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    n, device = (gpus, "cuda") if gpus else (max(1, cpus), "cpu")
    return max(1, min(n, files)), device


def score(bundle: str, src: str, dst: str, *, keep: list[str] | None = None, top_k: int | None = None,
          group: str | None = None, batch_size: int = 65536, s3: storage.S3Options | None = None) -> dict[str, Any]:
    """Score every row of `src` with `bundle` into `dst` (see the module docstring). Returns a summary (also
    written to DST/_manifest.json): rows scored, files scored now and found done, rows written, seconds."""
    t0 = time.time()
    s3 = s3 or storage.S3Options()
    if (top_k is None) != (group is None):
        raise DataError("--top-k and --group go together: the best K rows of each group")
    if top_k is not None and top_k < 1:
        raise DataError(f"--top-k must be at least 1, got {top_k}")
    pp, _, _ = load_bundle(bundle, s3)  # a bad bundle fails here, before any actor starts
    try:
        files = storage.list_files(src, s3, suffixes=(".parquet", ".pq"))
    except OSError as e:
        raise DataError(f"--data {src}: {e}") from None
    fs, root = storage.filesystem(src, s3)
    info = fs.get_file_info(root)
    root = root if info.type == storage.pafs.FileType.Directory else posixpath.dirname(files[0])
    keep = list(keep) if keep is not None else pq.read_schema(fs.open_input_file(files[0])).names
    keep += [group] if group and group not in keep else []
    check_inputs(files, fs, pp.input_columns, keep, "--data")
    scores_dir = storage.join(dst, SCORES_DIR) if top_k else dst
    prefix = "s3://" if storage.is_s3(src) else ""
    todo, done = [], 0
    for f in files:
        out = storage.join(scores_dir, output_name(root, f))
        if storage.exists(out, s3):
            done += 1
        else:
            todo.append((prefix + f, out))
    n, device = scorer_count(ray.cluster_resources(), len(todo))
    rows = 0
    if todo:
        opts = {"num_gpus": 1, "num_cpus": 1} if device == "cuda" else {"num_cpus": 1}
        actors = [Scorer.options(**opts).remote(bundle, s3, device) for _ in range(n)]
        pool = ray.util.ActorPool(actors)
        bar = console.Bar(f"score ({n} {device.upper()} scorer(s))", len(todo), "files")
        for i, r in enumerate(pool.map_unordered(lambda a, job: a.score_file.remote(job[0], job[1], keep, batch_size),
                                                 todo)):
            rows += r["rows"]
            bar.update(i + 1, f"{rows:,} rows, {rows / max(time.time() - t0, 1e-9):,.0f} rows/s")
        bar.close(f"score: {rows:,} rows in {len(todo)} file(s) ({done} done before), "
                  f"{rows / max(time.time() - t0, 1e-9):,.0f} rows/s")
        for a in actors:
            ray.kill(a)
    summary: dict[str, Any] = {"bundle": bundle, "data": src, "out": dst, "files": len(files), "scored_now": len(todo),
                               "already_done": done, "rows_scored_now": rows}
    if top_k:
        with console.step(f"top {top_k} per {group!r}") as st:
            fs_out, p_out = storage.filesystem(dst, s3)
            for old in fs_out.get_file_info(storage.pafs.FileSelector(p_out, recursive=False, allow_not_found=True)):
                if old.type == storage.pafs.FileType.File and old.path.endswith(".parquet"):
                    fs_out.delete_file(old.path)  # a rerun writes the top K again, whole
            scored = ray.data.read_parquet(storage.list_files(scores_dir, s3, suffixes=(".parquet",)),
                                           filesystem=fs_out, file_extensions=None)
            top = scored.groupby(group).map_groups(_top_k, fn_args=(top_k,), batch_format="pyarrow")
            top.write_parquet(p_out, filesystem=fs_out)
            summary["rows_written"] = sum(pq.read_metadata(fs_out.open_input_file(f)).num_rows
                                          for f in storage.list_files(dst, s3, suffixes=(".parquet",))
                                          if SCORES_DIR not in f.split("/"))
            st["done"] = f"{summary['rows_written']:,} rows"
    summary["seconds"] = time.time() - t0
    storage.write_text(storage.join(dst, "_manifest.json"), json.dumps(summary, indent=2), s3)
    return summary

