"""Give runs stored by the development code of 2026-12-06/07 the ids lopkit computes now (stores made before are fine).

For one session lopkit hashed every config field into the run id, so adding ``device`` (and the ViT/ResNet fields)
changed the ids of all runs: a store written then is not recognised by the current code, which leaves fields added
later out of the id while they hold their default (``run_id_neutral``, :func:`lopkit.configs.run_identity`).
This script recomputes each stored run's id from its stored config and renames it in every table
(runs, metrics, checkpoints) in one transaction per store. A run whose current id is already taken by another
stored copy of the same run (the same method, config and seed trained twice) is listed; with ``--drop-duplicates``
the copy under the old id is deleted when the other copy is finished.

Usage: python scripts/migrate_run_ids.py STORE_DIR [STORE_DIR ...] [--dry-run] [--drop-duplicates]
Stop any process writing to a store before migrating it.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path

from lopkit.benchmarks.registry import get_benchmark
from lopkit.configs import ConfigError, run_identity
from lopkit.runner.store import make_run_id, resolve_store_file

TABLES = ("runs", "metrics", "checkpoints")


def current_id(benchmark: str, method: str, config_json: str, seed: int) -> str | None:
    """The id the current code gives a stored run (None for a benchmark this installation does not know)."""
    try:
        config_cls = get_benchmark(benchmark).Config
    except ConfigError:
        return None
    return make_run_id(benchmark, method, run_identity(json.loads(config_json), config_cls), seed)


def migrate(folder: Path, dry_run: bool, drop_duplicates: bool) -> tuple[int, int, int]:
    """Rename the runs of one store; (renamed, duplicates, dropped)."""
    conn = sqlite3.connect(resolve_store_file(folder))
    tables = [t for (t,) in conn.execute("select name from sqlite_master where type='table'") if t in TABLES]
    rows = conn.execute("select run_id, benchmark, method, config_json, seed, status from runs").fetchall()
    status = {run_id: state for run_id, *_, state in rows}
    renamed = duplicates = dropped = 0
    with conn:
        for run_id, benchmark, method, config_json, seed, state in rows:
            new = current_id(benchmark, method, config_json, int(seed))
            if new is None or new == run_id:
                continue
            if new in status:
                duplicates += 1
                print(f"{folder}: {method} seed {seed}: stored twice ({run_id} {state}, {new} {status[new]})")
                if drop_duplicates and status[new] == "finished" and not dry_run:
                    for table in tables:
                        conn.execute(f"delete from {table} where run_id = ?", (run_id,))
                    dropped += 1
                continue
            renamed += 1
            if not dry_run:
                for table in tables:
                    conn.execute(f"update {table} set run_id = ? where run_id = ?", (new, run_id))
            status[new] = state
    conn.close()
    return renamed, duplicates, dropped


def main(argv: list[str] | None = None) -> int:
    """Migrate every store named on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stores", nargs="+", help="experiment folders (holding results.sqlite)")
    parser.add_argument("--dry-run", action="store_true", help="only print what would change")
    parser.add_argument("--drop-duplicates", action="store_true",
                        help="delete a copy under an old id when the copy under the current id is finished")
    args = parser.parse_args(argv)
    for folder in map(Path, args.stores):
        if not resolve_store_file(folder).exists():
            print(f"error: {folder} holds no results.sqlite; pass experiment folders", file=sys.stderr)
            return 2
        renamed, duplicates, dropped = migrate(folder, args.dry_run, args.drop_duplicates)
        verb = "would rename" if args.dry_run else "renamed"
        print(f"{folder}: {verb} {renamed} run(s); {duplicates} stored twice; {dropped} old copies dropped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
