"""Pieces every ``lopkit`` sub-command shares: exit codes, the one-line error, the progress flags and seeds."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from lopkit.configs import ConfigError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def error_exit(message: str) -> int:
    """Print one ``error: ...`` line on stderr (multi-line messages joined by ';') and return the usage exit code."""
    flat = "; ".join(line.strip() for line in str(message).splitlines() if line.strip())
    print(f"error: {flat}", file=sys.stderr)
    return EXIT_USAGE


def add_progress_flags(parser: argparse.ArgumentParser) -> None:
    """``--progress`` / ``--no-progress`` (mutually exclusive); the default draws bars only on a terminal."""
    bars = parser.add_mutually_exclusive_group()
    bars.add_argument("--progress", action="store_true", help="draw progress bars even when stderr is not a terminal")
    bars.add_argument("--no-progress", action="store_true", help="never draw progress bars")


def progress_mode(args: argparse.Namespace) -> bool | str:
    """The ``progress`` argument of ``execute_run`` from the parsed flags: "always", "never" or True (terminal only)."""
    if getattr(args, "progress", False):
        return "always"
    if getattr(args, "no_progress", False):
        return "never"
    return True


SEEDS_HELP = "a count (5 = seeds 0..4), a list (0,1,2), a range (10-14) or a mix (0-2,7)"


def _seed_item(text: str) -> list[int]:
    """``"7"`` -> [7]; ``"10-12"`` -> [10, 11, 12] (ValueError if not an integer or a range)."""
    first, sep, last = text.strip().partition("-")
    if not sep:
        return [int(first)]
    if not first.strip():  # "-3": a negative number, rejected by the caller
        return [-int(last)]
    return list(range(int(first), int(last) + 1))


def parse_seeds(value: str | int | Sequence[int], option: str = "--seeds", *, single_is_count: bool = True) -> list[int]:
    """The one seeds grammar: ``5`` or ``"5"`` -> seeds 0..4; ``"3,7"`` -> [3, 7]; ``"10-12"`` -> 10..12;
    ``"0-2,7"`` -> [0, 1, 2, 7]; a list of integers -> itself.

    With ``single_is_count=False`` a lone integer is one seed (``--seed-list 3`` -> [3]). ConfigError naming
    ``option`` unless the result is a non-empty list of distinct non-negative integers.
    """
    usage = f"{option} expects {SEEDS_HELP}"
    if isinstance(value, bool) or not isinstance(value, (str, int, list, tuple)):
        raise ConfigError(f"{usage}; got {value!r}")
    if isinstance(value, int):
        value = str(value)
    if isinstance(value, str):
        text = value.strip()
        if single_is_count and text.lstrip("-").isdigit():
            count = int(text)
            if count < 1:
                raise ConfigError(f"{option} must be >= 1 (a count of seeds), got {count}")
            return list(range(count))
        try:
            values = [s for item in text.split(",") if item.strip() for s in _seed_item(item)]
        except ValueError:
            raise ConfigError(f"{usage}, e.g. comma-separated integers such as 0,1,2; got {value!r}") from None
    else:
        if any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise ConfigError(f"{option}: seeds must be a list of non-negative integers, got {list(value)!r}")
        values = [int(v) for v in value]
    if not values:
        raise ConfigError(f"{usage}; {value!r} gives no seed")
    if any(v < 0 for v in values):
        raise ConfigError(f"{option}: seeds must be non-negative integers, got {value!r}")
    if len(set(values)) != len(values):
        raise ConfigError(f"{option}: seeds must be distinct, got {value!r}")
    return values
def add_threads_flag(parser: argparse.ArgumentParser, default: int | None = None) -> None:
    """``--threads N``: torch intra-op threads for a command that trains (one definition for every command)."""
    shown = "torch's default" if default is None else str(default)
    parser.add_argument("--threads", type=int, default=default, metavar="N",
                        help=f"torch intra-op threads, >= 1 (default: {shown})")
def apply_threads(args: argparse.Namespace) -> int | None:
    """Set torch's intra-op threads from ``--threads`` (None leaves torch's default); ConfigError below 1."""
    threads = getattr(args, "threads", None)
    if threads is None:
        return None
    if isinstance(threads, bool) or int(threads) < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    import torch
    torch.set_num_threads(int(threads))
    return int(threads)
