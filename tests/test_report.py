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
        # a loss is >= 0: the lower end of the interval is clipped at 0 and the cell marked "*" when it was below
        assert numbers == pytest.approx([mean, max(0.0, mean - half), mean + half], rel=1e-3, abs=1e-12)
        assert cell.endswith("*") == (mean - half < 0)
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


# ----------------------------------------------------------------------------- valid ranges, clipped bands, few seeds
import json  # noqa: E402
import math  # noqa: E402

import matplotlib.axes  # noqa: E402

from lopkit.report import aggregate, plots, ranges  # noqa: E402


def test_valid_range_table_covers_fractions_losses_ranks_and_unknown_metrics():
    for name in ("dead_fraction", "dormant_fraction", "frozen_fraction", "duplicate_fraction", "saturated_fraction",
                 "task_test_accuracy", "online_accuracy", "task_final_train_accuracy", "expert_dead_fraction"):
        assert ranges.valid_range(name) == (0.0, 1.0), name
    for name in ("online_mse", "loss", "task_final_loss", "effective_rank", "stable_rank", "weight_norm", "aux_loss"):
        assert ranges.valid_range(name) == (0.0, math.inf), name
    assert ranges.valid_range("cloning_r2_forward") == (-math.inf, 1.0)
    assert ranges.valid_range("my_score") == (-math.inf, math.inf)


def _write_store(folder, runs: list[dict], rows: list[dict]) -> None:
    """Synthetic runs (benchmark, method, config, seed, key) and their metric rows (keyed by ``key``) into a store."""
    store = ResultStore(folder)
    for run in runs:
        record = store.start_run(run["benchmark"], run["method"], run["config"], run["seed"])
        mine = [r for r in rows if r["key"] == run["key"]]
        store.commit_chunk(record.run_id, mine, None, max(r["step"] for r in mine))
        store.finish_run(record.run_id)
    store.close()


@pytest.fixture()
def fraction_store(tmp_path):
    """dead_fraction near 0 and 1 (so a t-interval leaves [0, 1]): 'wide' has 3 seeds, 'narrow' has 2."""
    runs, rows = [], []
    per_seed = {"wide": [[0.0, 0.02, 0.9], [0.1, 0.95, 1.0], [0.0, 0.5, 0.99]], "narrow": [[0.2, 0.3, 0.4], [0.3, 0.4, 0.5]]}
    for width, (name, seeds) in zip((8, 16), per_seed.items()):
        for seed, values in enumerate(seeds):
            key = f"{name}-{seed}"
            runs.append({"benchmark": "bitflip", "method": "sgd", "config": {"width": width}, "seed": seed, "key": key})
            for step, value in zip((0, 100, 200), values):
                rows.append({"key": key, "step": step, "task": 0, "layer": "act1", "metric": "dead_fraction",
                             "value": value})
    _write_store(tmp_path / "store", runs, rows)
    return tmp_path / "store", per_seed


def _drawn(monkeypatch):
    """Record every band (fill_between) and line (plot) matplotlib draws."""
    bands, lines = [], []
    fill, plot = matplotlib.axes.Axes.fill_between, matplotlib.axes.Axes.plot

    def record_fill(self, x, low, high, *args, **kwargs):
        bands.append((np.asarray(low, float), np.asarray(high, float)))
        return fill(self, x, low, high, *args, **kwargs)

    def record_plot(self, *args, **kwargs):
        lines.append(kwargs.get("linewidth"))
        return plot(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between", record_fill)
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", record_plot)
    return bands, lines


def test_band_is_clipped_to_the_valid_range_and_the_caption_says_where(fraction_store, tmp_path, monkeypatch):
    folder, per_seed = fraction_store
    bands, _ = _drawn(monkeypatch)
    result = build_report(folder, tmp_path / "report.html")
    assert len(bands) == 1  # only the 3-seed configuration gets a band
    low, high = bands[0]
    assert (low >= 0).all() and (high <= 1).all()
    # independent count of the points whose raw t-interval leaves [0, 1]
    values = np.array(per_seed["wide"])
    half = stats.t.ppf(0.975, 2) * values.std(axis=0, ddof=1) / np.sqrt(3)
    outside = int(np.sum((values.mean(axis=0) - half < 0) | (values.mean(axis=0) + half > 1)))
    assert outside >= 2
    page = result.html_path.read_text()
    assert f"95 % band clipped to the valid range [0, 1] at {outside} points" in page


def test_fewer_than_three_seeds_draws_the_seeds_and_says_so(fraction_store, tmp_path, monkeypatch):
    folder, _ = fraction_store
    bands, lines = _drawn(monkeypatch)
    result = build_report(folder, tmp_path / "report.html")
    page = result.html_path.read_text()
    assert "Fewer than 3 seeds, so no band" in page and "sgd width=16 (n=2)" in page
    assert "sgd width=8 (n=3)" not in page  # the 3-seed configuration is not listed as having too few seeds
    assert lines.count(0.7) == 2  # the two seeds of the 2-seed configuration, as thin lines
    assert len(bands) == 1


def test_summary_cells_are_clipped_to_the_valid_range_and_marked(fraction_store, tmp_path):
    folder, _ = fraction_store
    result = build_report(folder, tmp_path / "report.html")
    for cell in result.summary["dead_fraction"]:
        mean, low, high = (float(x) for x in re.findall(r"[-+0-9.e]+", cell))
        assert 0 <= low <= mean <= high <= 1
    assert result.summary.loc["sgd width=16", "dead_fraction"].endswith("*")  # 2 seeds: [-1.5, 2.4] clipped


def test_labels_of_a_store_with_several_benchmarks_name_only_what_differs_within_each():
    def run(benchmark, seed, **config):
        return {"benchmark": benchmark, "method": "sgd", "seed": seed, "config_json": json.dumps(config)}

    runs = pd.DataFrame([
        run("toy", 0, width=16, batch_size=16, lr=0.05), run("toy", 1, width=16, batch_size=16, lr=0.05),
        run("toy", 0, width=16, batch_size=32, lr=0.05),
        run("bitflip", 0, width=10, lr=0.01, flip_period=500), run("bitflip", 1, width=10, lr=0.01, flip_period=500),
    ])
    labels = aggregate.config_labels(runs)
    assert labels.tolist() == ["toy sgd batch_size=16", "toy sgd batch_size=16", "toy sgd batch_size=32",
                               "bitflip sgd", "bitflip sgd"]
    assert not any("nan" in label for label in labels)


def test_restrict_layers_reads_each_metric_on_the_chosen_layer_where_it_was_recorded():
    rows = [
        ("r", 0, "fc1", "duplicate_fraction", 0.4), ("r", 0, "act1", "duplicate_fraction", 0.0),
        ("r", 0, "act1", "dead_fraction", 0.9), ("r", 0, "model", "online_mse", 0.3),
        ("r", 0, "fc1", "effective_rank", 7.5), ("r", 0, "act1", "effective_rank", 3.0),
    ]
    metrics = pd.DataFrame(rows, columns=["run_id", "step", "layer", "metric", "value"]).assign(task=0)
    default = aggregate.step_values(metrics).set_index("metric")["value"]
    chosen = aggregate.step_values(aggregate.restrict_layers(metrics, ["fc1"])).set_index("metric")["value"]
    assert default["duplicate_fraction"] == 0.0 and chosen["duplicate_fraction"] == 0.4  # act1 by default, fc1 asked
    assert default["effective_rank"] == 3.0 and chosen["effective_rank"] == 7.5
    assert chosen["dead_fraction"] == 0.9 and chosen["online_mse"] == 0.3  # not recorded on fc1: kept as they were
    with pytest.raises(ValueError, match="no metric was recorded on layer"):
        aggregate.restrict_layers(metrics, ["fc9"])
