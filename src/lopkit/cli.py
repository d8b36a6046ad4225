"""The ``lopkit`` command line: each sub-command lives with the sub-package that owns it."""

from __future__ import annotations

import argparse
import importlib
import sys

# module path of each sub-command group; each module exposes ``register(subparsers)``
# which adds its parsers and sets ``func`` (a callable taking the parsed args, returning an exit code).
COMMAND_MODULES = [
    "lopkit.demo",
    "lopkit.runner.cli",
    "lopkit.runner.compare_cli",
    "lopkit.runner.sweep_cli",
    "lopkit.runner.diagnose_cli",
    "lopkit.report.cli",
    "lopkit.moe.cli",
    "lopkit.kws.cli",
]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every sub-command that can be imported."""
    parser = argparse.ArgumentParser(
        prog="lopkit",
        description="Find, explain and fix loss of plasticity in PyTorch models.",
        epilog="Run 'lopkit COMMAND --help' for the options of a command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:  # a sub-package not built yet
            if err.name and name.startswith(err.name):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lopkit`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
