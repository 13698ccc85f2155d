"""Local paths and s3:// URIs behind one small API (pyarrow filesystems)."""
from __future__ import annotations

import fnmatch
import os
import posixpath
import uuid
from dataclasses import dataclass

import pyarrow.fs as pafs


@dataclass(frozen=True)
class S3Options:
    endpoint_url: str | None = None
    region: str | None = None

    def resolved(self) -> S3Options:
        return S3Options(
            endpoint_url=self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
            region=self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        )


def is_s3(path: str) -> bool:
    return path.startswith("s3://")


def filesystem(path: str, s3: S3Options | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it). Credentials come from the usual AWS variables."""
    if is_s3(path):
        o = (s3 or S3Options()).resolved()
        kw: dict = {"region": o.region}
        if o.endpoint_url:
            scheme, _, host = o.endpoint_url.partition("://")
            kw.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
        return pafs.S3FileSystem(**kw), path[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_s3(base) else os.path.join(base, *parts)


def exists(path: str, s3: S3Options | None = None) -> bool:
    fs, p = filesystem(path, s3)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def list_files(path: str, s3: S3Options | None = None, suffixes: tuple[str, ...] = ()) -> list[str]:
    """Files under a file, a directory (recursively) or a glob, sorted; hidden/underscore files skipped.
    Returned paths are inside the filesystem (no s3:// prefix)."""
    fs, p = filesystem(path, s3)
    if any(c in p for c in "*?["):
        base = p.split("*")[0].split("?")[0].split("[")[0]
        base = base if base.endswith("/") else posixpath.dirname(base)
        infos = fs.get_file_info(pafs.FileSelector(base.rstrip("/") or "/", recursive=True, allow_not_found=True))
        files = [i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, p)]
    else:
        info = fs.get_file_info(p)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"no such file or directory: {path}")
        if info.type == pafs.FileType.File:
            return [p]
        infos = fs.get_file_info(pafs.FileSelector(p, recursive=True))
        files = [i.path for i in infos if i.type == pafs.FileType.File]
    files = [f for f in files if not posixpath.basename(f).startswith(("_", "."))]
    if suffixes:
        files = [f for f in files if f.endswith(suffixes)]
    if not files:
        raise FileNotFoundError(f"no data files found at {path}")
    return sorted(files)


def write_bytes(path: str, data: bytes, s3: S3Options | None = None) -> None:
    fs, p = filesystem(path, s3)
    fs.create_dir(posixpath.dirname(p), recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(data)


def read_bytes(path: str, s3: S3Options | None = None) -> bytes:
    fs, p = filesystem(path, s3)
    with fs.open_input_stream(p) as f:
        return f.read()


def write_text(path: str, text: str, s3: S3Options | None = None) -> None:
    write_bytes(path, text.encode(), s3)


def read_text(path: str, s3: S3Options | None = None) -> str:
    return read_bytes(path, s3).decode()


def delete_dir(path: str, s3: S3Options | None = None) -> None:
    fs, p = filesystem(path, s3)
    if fs.get_file_info(p).type != pafs.FileType.NotFound:
        fs.delete_dir(p)


def temp_sibling(path: str) -> str:
    """A fresh name next to `path`, for write-then-rename."""
    return f"{path.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}"
