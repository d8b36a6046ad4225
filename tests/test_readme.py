"""The README's Python snippets run as written (on a tiny model and data) and use the ``lk.`` public API."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import lopkit as lk

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks of a Markdown text, in order."""
    return [m.group(1) for m in re.finditer(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, re.S | re.M)]


def harness() -> dict[str, object]:
    """The names the snippets take as given: a small ReLU MLP, its loader, loss, optimizer and a probe batch."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    xs = torch.randn(12, 8, 6, generator=generator)
    ys = torch.randint(0, 3, (12, 8), generator=generator)
    return {
        "torch": torch, "nn": nn, "model": model, "loader": list(zip(xs, ys)),
        "loss_fn": nn.CrossEntropyLoss(), "optimizer": torch.optim.SGD(model.parameters(), lr=0.01),
        "probe_x": torch.randn(32, 6, generator=generator), "probe_y": torch.randint(0, 3, (32,), generator=generator),
    }


def test_python_blocks_are_found():
    assert python_blocks("a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = 2\n```\n") == ["x = 1\n", "y = 2\n"]


BLOCKS = python_blocks(README.read_text())


def test_readme_has_python_snippets():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_snippet_runs(index):
    namespace = harness()
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), namespace)  # noqa: S102


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_snippet_uses_the_public_api(index):
    """No snippet imports an everyday name from its sub-module: ``lk.Monitor``, not ``lopkit.diagnostics...``."""
    for line in BLOCKS[index].splitlines():
        found = re.match(r"\s*from\s+lopkit\.\S+\s+import\s+(.+)", line)
        if found:
            names = {n.strip().split(" as ")[0] for n in found.group(1).strip("()").split(",")}
            assert not names & set(lk.__all__), f"use lk.{sorted(names & set(lk.__all__))[0]}: {line.strip()}"


def test_readme_lists_every_registered_method():
    from lopkit.mitigations.registry import METHODS, available_methods

    available_methods()  # imports every method module
    section = README.read_text().split("\nMethods: ", 1)[1].split("\n\n", 1)[0]
    listed = set(re.findall(r"`([a-z_0-9]+)`", section))
    missing = sorted(name for name, cls in METHODS.items() if name == cls.name and name not in listed)
    assert not missing, f"README's method list lacks {missing}"
