"""The plain-text summary of a sweep's outcomes."""

from __future__ import annotations

from collections.abc import Sequence

from lopkit.runner.sweep.schema import RunOutcome

__all__ = ["format_summary", "summary_counts"]


def summary_counts(outcomes: Sequence[RunOutcome]) -> dict[str, int]:
    """Number of runs per status, in a fixed order (statuses with zero runs omitted)."""
    order = ("finished", "skipped", "failed", "interrupted", "paused", "cancelled")
    counts = {status: sum(o.status == status for o in outcomes) for status in order}
    return {status: count for status, count in counts.items() if count}


def format_summary(outcomes: Sequence[RunOutcome], max_rows: int = 40) -> str:
    """A plain-text table: one line per run (status, seconds, run, first line of the error) and the totals.

    With more than ``max_rows`` runs only the runs that did not finish or skip are listed.
    """
    listed = list(outcomes) if len(outcomes) <= max_rows else [
        o for o in outcomes if o.status not in ("finished", "skipped")
    ]
    lines = []
    if listed:
        width = max(len(o.spec.label) for o in listed)
        lines.append(f"{'status':<11} {'seconds':>8}  {'run':<{width}}  error")
        for o in listed:
            seconds = f"{o.seconds:8.1f}" if o.status == "finished" or o.seconds else f"{'-':>8}"
            lines.append(f"{o.status:<11} {seconds}  {o.spec.label:<{width}}  {o.error_line}".rstrip())
    totals = ", ".join(f"{count} {status}" for status, count in summary_counts(outcomes).items())
    lines.append(f"{len(outcomes)} runs: {totals}")
    return "\n".join(lines)
