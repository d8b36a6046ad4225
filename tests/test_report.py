"""The report: PNGs and one self-contained HTML page from a real (toy) experiment store."""

import base64
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from lopkit.benchmarks.toy import ToyBenchmark
from lopkit.report.build import build_report
from lopkit.runner.execute import execute_run
from lopkit.runner.store import ResultStore


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """Two configurations (width 8 and 16) x 3 seeds of the toy benchmark in one store."""
    folder = tmp_path_factory.mktemp("exp")
    store = ResultStore(folder)
    for width in (8, 16):
        config = ToyBenchmark.make_config("smoke", {"width": width})
        for seed in range(3):
            execute_run(store, ToyBenchmark, config, seed, progress=False, preset="smoke")
    store.close()
    return folder


def test_report_writes_inline_html_and_pngs(experiment, tmp_path):
    result = build_report(experiment, tmp_path / "report.html")
    page = result.html_path.read_text()
    assert {p.name for p in result.png_paths} >= {"loss.png", "task_final_loss.png"}
    for path in result.png_paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == len(result.png_paths)  # every figure inlined, nothing linked from disk
    assert base64.b64decode(images[0])[:4] == b"\x89PNG"
    assert "src='http" not in page and "src=\"http" not in page
    assert "sgd width=16" in page and "sgd width=8" in page  # one label per configuration


def test_summary_table_matches_an_independent_computation(experiment, tmp_path):
    result = build_report(experiment, tmp_path / "report.html")
    store = ResultStore(experiment)
    runs, metrics = store.runs(), store.metrics()
    store.close()
    rows = metrics[metrics.metric == "task_final_loss"]
    widths = runs.set_index("run_id")["config_json"].map(lambda c: pd.read_json(pd.io.common.StringIO(c), typ="series")["width"])
    finals = []
    for run_id, group in rows.groupby("run_id"):
        cutoff = group.step.max() - 0.1 * (group.step.max() - group.step.min())
        finals.append((widths[run_id], group[group.step >= cutoff].value.mean()))
    for width in (8, 16):
        values = np.array([v for w, v in finals if w == width])
        mean = values.mean()
        half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
        cell = result.summary.loc[f"sgd width={width}", "task_final_loss"]
        numbers = [float(x) for x in re.findall(r"[-+0-9.e]+", cell)]
        assert numbers == pytest.approx([mean, mean - half, mean + half], rel=1e-3)
        assert result.summary.loc[f"sgd width={width}", "seeds"] == 3


def test_report_cli_missing_store_is_a_clear_error(tmp_path, capsys):
    from lopkit.cli import main

    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no results store" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(experiment, tmp_path):
    result = build_report(experiment, tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         f"--screenshot={shot}", "--window-size=1400,2000", f"file://{result.html_path}"],
        check=True, capture_output=True, timeout=120,
    )
    assert shot.stat().st_size > 20_000  # a blank page compresses to a few KB
