"""The shared ``benchmarks/_record.py`` helper that keeps the figure table of ``benchmarks/README.md`` generated."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_record():
    """Import benchmarks/_record.py (the benchmarks folder is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("_record", ROOT / "benchmarks" / "_record.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(module, text: str) -> list[list[str]]:
    """Cells of the data rows between the markers."""
    body = text.split(module.START, 1)[1].split(module.END, 1)[0]
    lines = [line for line in body.strip().splitlines()[2:]]
    return [[cell.strip() for cell in line.strip().strip("|").split(" | ")] for line in lines]


def test_the_readme_has_the_marked_table() -> None:
    module = load_record()
    text = (ROOT / "benchmarks" / "README.md").read_text()
    assert text.index(module.START) < text.index(module.END)
    header = text.split(module.START, 1)[1].strip().splitlines()[0]
    assert [c.strip() for c in header.strip("|").split("|")] == list(module.HEADER)


def test_record_adds_then_replaces_a_row_and_keeps_the_rest(tmp_path: Path) -> None:
    module = load_record()
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\ntext\n\n{module.START}\n| key | script | figure | command | machine | date |\n"
                      f"|---|---|---|---|---|---|\n{module.END}\n\nafter\n")
    module.record("b/figure", "b.py", "2.0 steps/s", command="python benchmarks/b.py", readme=readme)
    module.record("a/figure", "a.py", "ratio 1.10 | old", command="python benchmarks/a.py --x", readme=readme)
    module.record("b/figure", "b.py", "3.5 steps/s", command="python benchmarks/b.py --more", readme=readme)
    text = readme.read_text()
    assert text.startswith("# title\n\ntext\n\n") and text.endswith("\n\nafter\n")
    rows = table_rows(module, text)
    assert [row[0] for row in rows] == ["a/figure", "b/figure"]  # sorted by key, b replaced (not duplicated)
    assert rows[1][1:4] == ["b.py", "3.5 steps/s", "`python benchmarks/b.py --more`"]
    assert rows[0][2] == "ratio 1.10 \\| old"  # a pipe inside a cell is escaped
    assert "thread" in rows[0][4] and "torch" in rows[0][4] and rows[0][5].endswith("UTC")


def test_a_readme_without_markers_is_a_clear_error(tmp_path: Path) -> None:
    module = load_record()
    readme = tmp_path / "README.md"
    readme.write_text("# no table\n")
    with pytest.raises(ValueError, match="no figure table"):
        module.record("k", "s.py", "1", command="c", readme=readme)
    assert readme.read_text() == "# no table\n"
