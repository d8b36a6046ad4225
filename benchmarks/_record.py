"""Write a benchmark script's figure into the generated table of ``benchmarks/README.md``.

The table between the markers ``<!-- figures:start -->`` and ``<!-- figures:end -->`` has one row per figure,
keyed by its first cell. :func:`record` replaces the row of a key (or appends it, rows kept sorted by key), so
the table is written by the scripts (each calls it when run with ``--record``), never typed by hand. Columns:
key, script, figure, command, machine, date (UTC).

Usage from a script::

    from _record import add_record_argument, record
    ...
    if args.record:
        record("monitor_overhead/1-thread", "monitor_overhead.py", "ratio 1.04 (cpu)", threads=1)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import re
import shlex
import sys
from pathlib import Path

__all__ = ["README", "START", "END", "HEADER", "add_record_argument", "load", "machine_description", "one_blas_thread",
           "record", "update_table"]

#: The README whose table the scripts keep up to date.
README = Path(__file__).resolve().parent / "README.md"
START, END = "<!-- figures:start -->", "<!-- figures:end -->"
HEADER = ("key", "script", "figure", "command", "machine", "date")


def add_record_argument(parser: argparse.ArgumentParser) -> None:
    """Add the shared ``--record`` flag (write the figures into benchmarks/README.md)."""
    parser.add_argument("--record", action="store_true",
                        help="write the figures into the table of benchmarks/README.md (rows keyed by figure)")


def one_blas_thread() -> contextlib.AbstractContextManager:
    """Limit NumPy's BLAS to one thread when threadpoolctl is available (else a no-op)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        return contextlib.nullcontext()
    return threadpool_limits(1)


def load() -> str:
    """The 1/5/15-minute load averages (the machine may be shared)."""
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


def machine_description(threads: int | None = None, device: str = "cpu") -> str:
    """CPU model (or the CUDA device), core count, torch version, thread count and 1-minute load average."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        where = f"{torch.cuda.get_device_name(torch.device(device))} (CUDA {torch.version.cuda})"
    else:
        where = _cpu_model() or platform.machine()
    threads = torch.get_num_threads() if threads is None else threads
    load = f", load {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{where}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} thread(s){load}"


def _cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return found.group(1).strip() if found else ""


def _cell(text: str) -> str:
    """One table cell: single line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def update_table(text: str, key: str, cells: dict[str, str]) -> str:
    """``text`` with the row of ``key`` in the marked table replaced (or added); ValueError without the markers."""
    if START not in text or END not in text or text.index(START) > text.index(END):
        raise ValueError(f"the README has no figure table between {START} and {END}; add the two markers")
    before, rest = text.split(START, 1)
    body, after = rest.split(END, 1)
    rows: dict[str, str] = {}
    for line in body.strip().splitlines():
        parts = [p.strip() for p in line.strip().strip("|").split(" | ")]
        if not line.startswith("|") or parts[0] in (HEADER[0], "---") or set(line) <= set("|- "):
            continue
        rows[parts[0]] = line.strip()
    values = {"key": key, **cells}
    rows[key] = "| " + " | ".join(_cell(values.get(name, "")) for name in HEADER) + " |"
    table = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    table += [rows[k] for k in sorted(rows)]
    return before + START + "\n" + "\n".join(table) + "\n" + END + after


def record(key: str, script: str, figure: str, *, threads: int | None = None, device: str = "cpu",
           command: str | None = None, readme: Path = README) -> None:
    """Write one figure's row (script, figure, the command that ran, this machine, today's UTC date)."""
    if command is None:
        command = "python " + " ".join(shlex.quote(a) for a in [f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    cells = {
        "script": script,
        "figure": figure,
        "command": f"`{command}`",
        "machine": machine_description(threads, device),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    readme.write_text(update_table(readme.read_text(), key, cells))
    print(f"recorded {key!r} in {readme}")
