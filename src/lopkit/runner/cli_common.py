"""Pieces every ``lopkit`` sub-command shares: exit codes, the one-line error and the progress flags."""

from __future__ import annotations

import argparse
import sys

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
        from lopkit.configs import ConfigError

        raise ConfigError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(int(threads))
    return int(threads)
