"""The report's "Diagnosis" section: ``lopkit diagnose``'s verdict per configuration as tables (trap, evidence, cures)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def diagnosis_frame(diagnosis) -> pd.DataFrame:
    """One row per finding of a :class:`~lopkit.diagnostics.diagnose.Diagnosis` (one row when healthy or not judged)."""
    from lopkit.diagnostics.diagnose import format_number

    if not diagnosis.judged:
        return pd.DataFrame([{"layer": "all", "trap": "not judged",
                              "evidence": "no per-layer unit metrics stored (record them with the Monitor)",
                              "trend": "", "cures to try": ""}])
    if diagnosis.healthy:
        return pd.DataFrame([{"layer": "all", "trap": "none", "evidence": "every layer within the thresholds",
                              "trend": "", "cures to try": ""}])
    rows = []
    for finding in diagnosis.findings:
        trend = "; ".join(" -> ".join(format_number(v) for _, v in (e.trend[0], e.trend[-1])) + f" (steps {e.trend[0][0]}-"
                          f"{e.trend[-1][0]})" for e in finding.evidence if e.trend)
        rows.append({"layer": finding.layer, "trap": finding.label,
                     "evidence": "; ".join(e.describe() for e in finding.evidence), "trend": trend,
                     "cures to try": ", ".join(f"{i + 1}. {c.method}" for i, c in enumerate(finding.cures))})
    return pd.DataFrame(rows)


def diagnose_tables(experiment_dir: str | Path) -> tuple[list[tuple[str, pd.DataFrame]], list[str]]:
    """(caption, table) per configuration of the experiment's store, plus notes; ([], [reason]) when it cannot run."""
    from lopkit.runner.diagnose_cli import diagnose_store
    from lopkit.runner.store import store_path

    try:
        results = diagnose_store(store_path(experiment_dir))
    except Exception as err:  # noqa: BLE001  (the rest of the report must not be lost to the diagnosis)
        return [], [f"Diagnosis: not available ({type(err).__name__}: {err})."]
    tables = [(f"Diagnosis: {d.source}", diagnosis_frame(d)) for d, _ in results]
    notes = ["Diagnosis ('lopkit diagnose'): per layer the plasticity trap, its evidence against the threshold (the "
             "reference is each run's first measurement), and the cures ranked as --method specs; the theory behind "
             "each trap is in docs/diagnose.md and in 'lopkit diagnose EXPERIMENT_DIR'."]
    return tables, notes
