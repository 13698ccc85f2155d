"""The model bundle: one directory (local or s3://) of plain files that fully describes a servable model.

Nothing in a bundle is ever unpickled. `manifest.json` lists every file with its sha256; a reader trusts
a bundle only when the manifest exists, every listed file matches it and nothing else is present.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import safetensors
from safetensors.torch import load as tensors_from_bytes
from safetensors.torch import save as tensors_to_bytes
import torch

from training.config import Config, dump_config, load_config, parse_yaml
from training import storage
from training.features import Preprocessor
from training.models import model_from_arch
from training.scoring import score_rows, unwrap
from training.storage import S3Options

FORMAT = "rankray.bundle/1"
MANIFEST = "manifest.json"
REQUIRED = ("config.yaml", "preprocessor.json", "arch.json", "weights.safetensors", "metrics.json", "samples.json")
FORBIDDEN_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".joblib")  # pickle-based formats


class BundleError(ValueError):
    """A bundle that cannot be written or must not be trusted. The message names the file."""


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON-serializable")


def _dumps(obj: Any, what: str) -> bytes:
    try:
        return json.dumps(obj, default=_jsonable, indent=1).encode()
    except TypeError as e:
        raise BundleError(f"{what}: {e}") from None


def _file_names(path: str, s3: S3Options | None) -> list[str] | None:
    """Names of all files under the bundle directory, relative to it; None when it does not exist."""
    fs, root = storage.filesystem(path, s3)
    kind = fs.get_file_info(root).type
    if kind == pafs.FileType.NotFound:
        return None
    if kind == pafs.FileType.File:
        raise BundleError(f"{path} is a file, not a bundle directory")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sorted(posixpath.relpath(i.path, root) for i in infos if i.type == pafs.FileType.File)


def _check_replaceable(path: str, s3: S3Options | None) -> list[str]:
    """Existing file names at `path`; refuses to replace a directory that is not a bundle (e.g. `runs/`)."""
    names = _file_names(path, s3) or []
    if names and MANIFEST not in names and set(names) - set(REQUIRED) - {"report.html"}:
        raise BundleError(f"refusing to replace {path}: it exists and is not a model bundle (no {MANIFEST})")
    return names


def save_bundle(path: str, cfg: Config, pp: Preprocessor, model: torch.nn.Module, arch: dict[str, Any],
                metrics: dict[str, Any], samples: list[dict[str, Any]], *, info: dict[str, Any] | None = None,
                report_html: str | None = None, drift: dict[str, Any] | None = None,
                s3: S3Options | None = None) -> str:
    """Write a bundle atomically (replacing any bundle at `path`) and return its version string. `drift`: the
    training distribution serving compares its traffic with (training.drift.reference)."""
    path = path.rstrip("/")
    model = unwrap(model)
    info = dict(info or {})
    # Score the rows after a JSON round trip, so the recorded scores are for exactly what a reader sees.
    rows = json.loads(_dumps(list(samples), "samples.json"))
    scores = score_rows(pp, model, rows)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    files = {
        "config.yaml": dump_config(cfg).encode(),
        "preprocessor.json": pp.to_json().encode(),
        "arch.json": _dumps(arch, "arch.json"),
        "weights.safetensors": tensors_to_bytes(state),
        "metrics.json": _dumps({"metrics": metrics, "info": info}, "metrics.json"),
        "samples.json": _dumps({"rows": rows, "scores": scores.tolist()}, "samples.json"),
    }
    if report_html is not None:
        files["report.html"] = report_html.encode()
    if drift is not None:
        files["drift.json"] = _dumps(drift, "drift.json")
    listing = {n: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)} for n, b in sorted(files.items())}
    now = datetime.now(timezone.utc)
    digest = hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()
    version = f"{now:%Y%m%dT%H%M%SZ}-{digest[:8]}"
    manifest = _dumps({"format": FORMAT, "version": version, "created_at": now.isoformat(),
                       "files": listing, "info": info}, MANIFEST)
    old = _check_replaceable(path, s3)
    if storage.is_s3(path):
        _publish_s3(path, files, manifest, old, s3)
    else:
        _publish_local(path, files, manifest)
    return version


def _publish_local(path: str, files: dict[str, bytes], manifest: bytes) -> None:
    """Write into a temp sibling, then swap it in with renames: readers see the old or the new bundle."""
    path = os.path.abspath(path)
    tmp = storage.temp_sibling(path)
    try:
        for name, data in {**files, MANIFEST: manifest}.items():
            storage.write_bytes(os.path.join(tmp, name), data)
        if not os.path.exists(path):
            os.rename(tmp, path)
            return
        aside = storage.temp_sibling(path)
        os.rename(path, aside)
        try:
            os.rename(tmp, path)
        except OSError:
            os.rename(aside, path)
            raise
        shutil.rmtree(aside)  # _check_replaceable guarantees a directory
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish_s3(path: str, files: dict[str, bytes], manifest: bytes, old: list[str], s3: S3Options | None) -> None:
    """S3 has no rename: data files first, the manifest last (it is what makes the bundle valid), then
    stale files go. In between, readers fail the checksum or extra-file checks instead of mixing versions."""
    for name, data in files.items():
        storage.write_bytes(storage.join(path, name), data, s3)
    storage.write_bytes(storage.join(path, MANIFEST), manifest, s3)
    fs, root = storage.filesystem(path, s3)
    for name in set(old) - set(files) - {MANIFEST}:
        fs.delete_file(f"{root}/{name}")


def _read_manifest(path: str, s3: S3Options | None) -> dict[str, Any]:
    try:
        m = json.loads(storage.read_bytes(storage.join(path, MANIFEST), s3))
    except (FileNotFoundError, NotADirectoryError):
        raise BundleError(f"{MANIFEST}: missing at {path} (not a bundle, or still being written)") from None
    except ValueError as e:  # includes bad UTF-8
        raise BundleError(f"{MANIFEST}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BundleError(f"{MANIFEST}: not a {FORMAT} manifest (format={m.get('format') if isinstance(m, dict) else m!r})")
    listed = m.get("files")
    if not isinstance(listed, dict) or not all(isinstance(v, dict) and "sha256" in v for v in listed.values()):
        raise BundleError(f"{MANIFEST}: 'files' must map each file name to its sha256")
    missing = [n for n in REQUIRED if n not in listed]
    if missing:
        raise BundleError(f"{MANIFEST}: does not list required files {missing}")
    return m


def _read_verified(path: str, s3: S3Options | None) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest and the bytes of every listed file, after all trust checks."""
    m = _read_manifest(path, s3)
    present = _file_names(path, s3) or []
    for name in sorted(set(present) | set(m["files"])):
        if name.lower().endswith(FORBIDDEN_SUFFIXES):
            raise BundleError(f"{name}: pickle-style files are never loaded; refusing bundle {path}")
    extra = sorted(set(present) - set(m["files"]) - {MANIFEST})
    if extra:
        raise BundleError(f"{extra[0]}: file is not listed in {MANIFEST}; refusing bundle {path} (extra: {extra})")
    blobs: dict[str, bytes] = {}
    for name, entry in m["files"].items():
        if name not in present:  # also rules out names that point outside the bundle ("../x")
            raise BundleError(f"{name}: listed in {MANIFEST} but missing from {path}")
        data = storage.read_bytes(storage.join(path, name), s3)
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise BundleError(f"{name}: checksum mismatch (bundle tampered or partially written)")
        blobs[name] = data
    return m, blobs


def _check_arch(pp: Preprocessor, arch: dict[str, Any]) -> None:
    # A model whose tables disagree with the preprocessor would index out of range at the first request.
    want = [{"name": f.name, "cardinality": pp.cardinality(f.name), "slots": len(pp.slots(f))} for f in pp.cat_features]
    got = [{k: f.get(k) for k in ("name", "cardinality", "slots")} for f in arch["fields"]]
    if got != want or arch["num_numeric"] != len(pp.num_columns):
        raise ValueError("model inputs do not match preprocessor.json")


def load_bundle(path: str, s3: S3Options | None = None) -> tuple[Preprocessor, torch.nn.Module, dict[str, Any]]:
    """Verify and load a bundle: (preprocessor, model in eval mode on CPU, metadata).

    metadata: version, created_at, info, metrics, samples ({"rows": [...], "scores": [...]}),
    config (a Config), arch, path, drift (the training distribution, or None)."""
    path = path.rstrip("/")
    m, blobs = _read_verified(path, s3)
    name = "config.yaml"
    try:  # `name` tracks the file being parsed so the error names it
        cfg = load_config(raw=parse_yaml(blobs[name].decode()))
        name = "preprocessor.json"
        pp = Preprocessor.from_json(blobs[name].decode())
        name = "arch.json"
        arch = json.loads(blobs[name])
        _check_arch(pp, arch)
        model = model_from_arch(arch)
        name = "weights.safetensors"
        model.load_state_dict(tensors_from_bytes(blobs[name]), strict=True)
        name = "metrics.json"
        metrics = json.loads(blobs[name])["metrics"]
        name = "samples.json"
        samples = json.loads(blobs[name])
        if len(samples["rows"]) != len(samples["scores"]):
            raise ValueError("rows and scores differ in length")
        name = "drift.json"  # bundles from before it have none: no drift figures then
        drift = json.loads(blobs[name]) if name in blobs else None
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError, safetensors.SafetensorError) as e:
        raise BundleError(f"{name}: cannot be loaded ({type(e).__name__}: {e})") from None
    model.eval()
    meta = {"version": m.get("version"), "created_at": m.get("created_at"), "info": m.get("info", {}),
            "metrics": metrics, "samples": samples, "config": cfg, "arch": arch, "path": path, "drift": drift}
    return pp, model, meta


def verify_samples(pp: Preprocessor, model: torch.nn.Module, metadata: dict[str, Any], atol: float = 1e-5) -> float:
    """Re-score the bundle's sample rows; return the max abs difference, or raise BundleError above `atol`."""
    samples = metadata["samples"]
    diff = np.abs(score_rows(pp, model, samples["rows"]) - np.asarray(samples["scores"], np.float64))
    worst = float(diff.max(initial=0.0)) if np.isfinite(diff).all() else float("inf")
    if worst > atol:
        raise BundleError(f"samples.json: model scores differ from the recorded ones by {worst:.3g} "
                          f"(> {atol:g}); weights do not match the bundle's samples")
    return worst
