"""One source of figures: README.md's figures table is docs/BENCHMARKS.md's headline table from the same
`make bench` run, and the README states how long `make test` takes."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- figures: written by benchmarks/run_all.py -->", "<!-- /figures -->"


def _block(text: str, where: str) -> str:
    assert START in text and END in text, f"{where}: no figures block"
    return text[text.index(START):text.index(END) + len(END)]


def test_readme_figures_are_the_benchmark_runs_own():
    readme = _block((ROOT / "README.md").read_text(), "README.md")
    bench = _block((ROOT / "docs" / "BENCHMARKS.md").read_text(), "docs/BENCHMARKS.md")
    assert readme == bench
    rows = [ln for ln in readme.splitlines() if ln.startswith("| ") and not ln.startswith("| what")]
    assert len(rows) >= 8 and all(ln.count("|") == 4 and re.search(r"\d", ln) for ln in rows), rows


def test_run_all_replaces_only_the_figures_block(tmp_path):
    from benchmarks.run_all import figures_table, replace_figures

    table = figures_table([("what a", "1.00x", "python benchmarks/x.py")])
    text = f"intro\n{START}\n| old |\n{END}\ntail\n"
    assert replace_figures(text, table, "t") == f"intro\n{table}\ntail\n"
    with pytest.raises(SystemExit, match="no "):
        replace_figures("no block here", table, "t")


def test_readme_states_the_measured_test_time():
    text = (ROOT / "README.md").read_text()
    line = text.split("<!-- test time -->", 1)[1].strip().splitlines()[0]
    assert "`time make test`" in line and re.search(r"\d+ min \d+ s of tests", line), line
    assert re.search(r"\b20\d\d-\d\d-\d\d\b", line), line  # measured when
