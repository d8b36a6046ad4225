"""``lopkit report EXPERIMENT_DIR -o report.html``."""

from __future__ import annotations

import argparse


def _report(args: argparse.Namespace) -> int:
    from lopkit.configs import ConfigError
    from lopkit.report.build import build_report
    from lopkit.runner.cli_common import error_exit
    from lopkit.runner.store import StoreError

    try:
        layers = [name.strip() for name in args.layers.split(",") if name.strip()] if args.layers else None
        result = build_report(args.experiment_dir, args.output, args.png_dir, layers=layers)
    except (FileNotFoundError, ConfigError, StoreError, ValueError) as err:  # no store, a bad option or layer, damage
        return error_exit(str(err))
    except PermissionError as err:  # e.g. a read-only experiment folder: the store was read, the HTML cannot go there
        return error_exit(f"cannot write the report: {err}; pass -o PATH/report.html somewhere writable")
    print(f"wrote {result.html_path} and {len(result.png_paths)} PNGs in {result.png_paths[0].parent if result.png_paths else '-'}")
    if not result.summary.empty:
        with __import__("pandas").option_context("display.width", 200, "display.max_columns", 20):
            print(result.summary.to_string())
    return 0


def register(subparsers) -> None:
    """Add the ``report`` sub-command."""
    parser = subparsers.add_parser(
        "report", help="write an HTML report with plots from an experiment folder",
        description="Read EXPERIMENT_DIR/results.sqlite and write a self-contained HTML report (images inlined) "
                    "plus one PNG per metric: mean and 95%% interval over seeds, one colour per configuration. Bands are "
                    "clipped to the metric's valid range (fractions in [0, 1], losses and ranks >= 0) and a caption "
                    "says where; a configuration with fewer than 3 seeds is drawn seed by seed, without a band.")
    parser.add_argument("experiment_dir", help="folder written by 'lopkit run' (holds results.sqlite)")
    parser.add_argument("-o", "--output", default=None, help="HTML file to write (default: EXPERIMENT_DIR/report.html)")
    parser.add_argument("--png-dir", default=None, help="folder for the PNGs (default: next to the HTML file)")
    parser.add_argument("--layers", default=None, metavar="NAMES",
                        help="comma-separated layers to read each metric on where it was recorded there, e.g. fc1 for "
                             "bit-flipping's pre-activations as the paper plots them (default: the activation layers)")
    parser.set_defaults(func=_report)
