"""scripts/field_counts.py: the counts it prints come from the registries and the field notes."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from lopkit.mitigations.registry import NO_OP_NAMES, available_methods

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "field_counts.py"
NOTES = """# notes
## The strongest peer
A testbed ("peer-x"): 3 methods plus backprop on MLP
and ResNet-18 (l2, CBP, feature_norm; ViT supports CBP).

## Methods lopkit lacks (paper -> what it needs)
| method | source | mechanism |
|---|---|---|
| DASH | x | y |
| Nonexistent | x | y |

## Metrics lopkit lacks
"""


def test_counts_follow_the_registry_and_the_notes(tmp_path, monkeypatch, capsys):
    notes = tmp_path / "notes.md"
    notes.write_text(NOTES, encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["field_counts.py", "--spec", str(notes)])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    out = capsys.readouterr().out
    methods = [m for m in available_methods() if m not in NO_OP_NAMES]
    assert f"| lopkit | {len(methods)} registered" in out
    assert "| peer-x (field notes) | 3 (+ backprop) |" in out
    assert "| l2 | `l2` |" in out and "| CBP | `cbp` |" in out and "| feature_norm | missing |" in out
    assert "| DASH | `dash` |" in out and "| Nonexistent | missing |" in out


def test_missing_notes_give_one_error_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["field_counts.py", "--spec", str(tmp_path / "none.md")])
    with pytest.raises(SystemExit, match="error: field notes not found"):
        runpy.run_path(str(SCRIPT), run_name="__main__")
