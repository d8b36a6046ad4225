"""Tests of the ranking table (report.ranking) and of ``lopkit compare`` (runner.compare, runner.compare_cli)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from lopkit.report.ranking import (
    PrimaryMetric,
    choose_primary_metric,
    parse_primary_metric,
    ranking_table,
    representation_layers,
)


# ----------------------------------------------------------------------------- synthetic store rows
def _synthetic(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Three methods x three seeds of a fake bit-flipping run with an error curve and two monitored layers."""
    rng = np.random.default_rng(seed)
    runs, rows = [], []
    offsets = {"sgd": 0.5, "cbp": 0.1, "l2init": 0.2}
    for method, offset in offsets.items():
        for s in range(3):
            run_id = f"{method}-{s}"
            runs.append({"run_id": run_id, "benchmark": "bitflip", "method": method, "seed": s,
                         "config_json": json.dumps({"width": 10}), "status": "finished"})
            for step in range(0, 1001, 100):
                rows.append({"run_id": run_id, "step": step, "task": step // 500, "layer": "model",
                             "metric": "online_mse", "value": offset + step / 1000 * offset + rng.normal(0, 0.01)})
                for layer in ("act1", "fc1"):
                    rows.append({"run_id": run_id, "step": step, "task": step // 500, "layer": layer,
                                 "metric": "effective_rank", "value": float(rng.uniform(1, 10))})
                    rows.append({"run_id": run_id, "step": step, "task": step // 500, "layer": layer,
                                 "metric": "duplicate_fraction", "value": float(rng.uniform(0, 1))})
                rows.append({"run_id": run_id, "step": step, "task": step // 500, "layer": "act1",
                             "metric": "dead_fraction", "value": float(rng.uniform(0, 1))})
    return pd.DataFrame(runs), pd.DataFrame(rows)


def _t_interval(values: np.ndarray) -> tuple[float, float, float]:
    """Independent 95 % t-interval via scipy.stats.t.interval."""
    mean = float(np.mean(values))
    low, high = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=stats.sem(values))
    return mean, float(low), float(high)


def _independent_scores(metrics: pd.DataFrame, final_fraction: float = 0.1) -> pd.DataFrame:
    """Per run, final-window and AUC of online_mse and final act1 diagnostics, straight from the rows with pandas."""
    out = {}
    for run_id, group in metrics.groupby("run_id"):
        mse = group[group["metric"] == "online_mse"].sort_values("step")
        first, last = mse["step"].min(), mse["step"].max()
        window = mse[mse["step"] >= last - final_fraction * (last - first)]
        x, y = mse["step"].to_numpy(float), mse["value"].to_numpy(float)
        auc = float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / (x[-1] - x[0]))
        record = {"final": window["value"].mean(), "auc": auc}
        act = group[group["layer"] == "act1"]  # the only layer with dead_fraction
        for name in ("dead_fraction", "duplicate_fraction", "effective_rank"):
            rows = act[act["metric"] == name]
            cut = rows["step"].max() - final_fraction * (rows["step"].max() - rows["step"].min())
            record[name] = rows.loc[rows["step"] >= cut, "value"].mean()
        out[run_id] = record
    return pd.DataFrame.from_dict(out, orient="index")


def test_ranking_matches_independent_computation_and_sorts_lower_first():
    runs, metrics = _synthetic()
    ranking = ranking_table(runs, metrics)
    assert ranking.primary == PrimaryMetric("online_mse", False)
    assert ranking.layers == ["act1"]
    assert list(ranking.table.index) == ["cbp", "l2init", "sgd"]
    assert list(ranking.table["position"]) == [1, 2, 3]
    scores = _independent_scores(metrics)
    for method in ("sgd", "cbp", "l2init"):
        ids = [f"{method}-{s}" for s in range(3)]
        for ours, theirs in (("final_online_mse", "final"), ("auc_online_mse", "auc"), ("dead_fraction", "dead_fraction"),
                             ("duplicate_fraction", "duplicate_fraction"), ("effective_rank", "effective_rank")):
            mean, low, high = _t_interval(scores.loc[ids, theirs].to_numpy())
            row = ranking.table.loc[method]
            assert row[f"{ours}_mean"] == pytest.approx(mean, rel=1e-12)
            assert row[f"{ours}_low"] == pytest.approx(low, rel=1e-9)
            assert row[f"{ours}_high"] == pytest.approx(high, rel=1e-9)
    assert (ranking.table["seeds"] == 3).all()


def test_higher_is_better_metric_sorts_descending():
    runs, metrics = _synthetic()
    accuracy = metrics[metrics["metric"] == "online_mse"].assign(metric="online_accuracy")
    ranking = ranking_table(runs, pd.concat([metrics, accuracy]), primary="online_accuracy")
    assert ranking.primary.higher_is_better
    assert list(ranking.table.index) == ["sgd", "l2init", "cbp"]
    means = ranking.table["final_online_accuracy_mean"].to_numpy()
    assert np.all(np.diff(means) <= 0)
    text = ranking.to_text()
    assert "final online_accuracy ↑" in text and text.index("sgd") < text.index("cbp")


def test_primary_metric_choice_and_parsing():
    assert choose_primary_metric("bitflip", ["online_mse", "loss"]) == PrimaryMetric("online_mse", False)
    assert choose_primary_metric("class_split", ["online_accuracy", "task_test_accuracy"]).name == "task_test_accuracy"
    assert choose_primary_metric("class_split", ["online_accuracy"]).name == "online_accuracy"
    assert choose_primary_metric("unknown_bench", ["loss"]) == PrimaryMetric("loss", False)
    with pytest.raises(ValueError, match="primary metrics"):
        choose_primary_metric("bitflip", ["effective_rank"])
    assert parse_primary_metric("score:higher") == PrimaryMetric("score", True)
    assert parse_primary_metric("online_accuracy") == PrimaryMetric("online_accuracy", True)
    with pytest.raises(ValueError, match="higher or"):
        parse_primary_metric("score")
    with pytest.raises(ValueError, match="direction"):
        parse_primary_metric("score:sideways")


def test_missing_diagnostics_give_nan_and_layers_fall_back():
    runs, metrics = _synthetic()
    only_mse = metrics[metrics["metric"] == "online_mse"]
    ranking = ranking_table(runs, only_mse)
    assert ranking.table["dead_fraction_mean"].isna().all()
    assert "–" in ranking.formatted()["dead fraction"].iloc[0]
    no_dead = metrics[metrics["metric"] != "dead_fraction"]
    assert representation_layers(no_dead) == ["act1", "fc1"]


def test_single_seed_gives_zero_width_interval():
    runs, metrics = _synthetic()
    keep = runs[runs["seed"] == 0]
    ranking = ranking_table(keep, metrics)
    row = ranking.table.loc["sgd"]
    assert row["final_online_mse_low"] == row["final_online_mse_mean"] == row["final_online_mse_high"]
    assert not math.isnan(row["final_online_mse_mean"])


# ----------------------------------------------------------------------------- lopkit compare on the toy benchmark
from lopkit.configs import ConfigError  # noqa: E402
from lopkit.runner.compare import build_plan, parse_method_list, parse_seeds  # noqa: E402
from lopkit.runner.compare_cli import main as compare_main  # noqa: E402
from lopkit.runner.store import ResultStore  # noqa: E402

TOY_ARGS = ["toy", "--preset", "smoke", "--set", "num_tasks=2", "steps_per_task=20", "log_every=5",
            "--seeds", "2", "--no-progress"]


def _store_frames(out) -> tuple[pd.DataFrame, pd.DataFrame]:
    with ResultStore(out) as store:
        return store.runs(), store.metrics()


def test_compare_runs_grid_then_skips_finished_runs(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert compare_main([*TOY_ARGS, "--methods", "sgd,l2init,snp", "--out", str(out), "--no-report"]) == 0
    runs, metrics = _store_frames(out)
    assert len(runs) == 6 and set(runs["status"]) == {"finished"}
    assert sorted(runs["method"].unique()) == ["l2init", "sgd", "shrink_perturb"]
    assert sorted(runs["seed"].unique()) == [0, 1]
    assert runs["config_json"].nunique() == 1 and runs["total_steps"].nunique() == 1  # same config and budget
    first_out = capsys.readouterr().out
    assert first_out.count(": finished at step 40/40") == 6

    assert compare_main([*TOY_ARGS, "--methods", "sgd,l2init,snp", "--out", str(out), "--no-report"]) == 0
    second_out = capsys.readouterr().out
    assert second_out.count("already finished") == 6 and "finished at step" not in second_out
    runs_again, metrics_again = _store_frames(out)
    pd.testing.assert_frame_equal(runs, runs_again)
    assert len(metrics_again) == len(metrics)


def test_compare_resumes_an_interrupted_cell(tmp_path, capsys):
    from lopkit.runner.execute import execute_run

    out = tmp_path / "cmp"
    plan = build_plan("toy", "sgd,l2init", 1, "smoke", {"num_tasks": 2, "steps_per_task": 20, "log_every": 5})
    with ResultStore(out) as store:
        paused = execute_run(store, "toy", plan.config, 0, ("l2init",), checkpoint_every=10, progress="never",
                             preset="smoke", stop_after_steps=10)
    assert paused.status == "paused" and paused.run_id == plan.run_id(plan.methods[1], 0)
    args = ["toy", "--preset", "smoke", "--set", "num_tasks=2", "steps_per_task=20", "log_every=5",
            "--seeds", "1", "--no-progress", "--methods", "sgd,l2init", "--out", str(out), "--no-report"]
    assert compare_main(args) == 0
    text = capsys.readouterr().out
    assert "l2init seed 0: finished at step 40/40" in text and "resumed from step 10" in text
    runs, metrics = _store_frames(out)
    assert set(runs["status"]) == {"finished"} and len(runs) == 2
    # the resumed run has each (step, metric) row exactly once
    resumed = metrics[metrics["run_id"] == paused.run_id]
    assert not resumed.duplicated(["step", "layer", "metric"]).any()


def test_ranking_csv_equals_independent_pandas_computation(tmp_path):
    out = tmp_path / "cmp"
    html = tmp_path / "page.html"
    assert compare_main([*TOY_ARGS, "--methods", "sgd,l2init:strength=0.01,noisy_sgd", "--out", str(out),
                         "-o", str(html)]) == 0
    table = pd.read_csv(out / "ranking.csv", index_col="method")
    runs, metrics = _store_frames(out)
    loss = metrics[metrics["metric"] == "loss"]
    expected = {}
    for method, group in loss.groupby("method"):
        finals, aucs = [], []
        for _, run in group.groupby("run_id"):
            run = run.sort_values("step")
            x, y = run["step"].to_numpy(float), run["value"].to_numpy(float)
            finals.append(run.loc[run["step"] >= x[-1] - 0.1 * (x[-1] - x[0]), "value"].mean())
            aucs.append(np.trapezoid(y, x) / (x[-1] - x[0]))
        expected[method] = (_t_interval(np.array(finals)), _t_interval(np.array(aucs)))
    assert set(table.index) == set(expected) == {"sgd", "l2init:strength=0.01", "noisy_sgd"}
    for method, ((mean, low, high), (auc, auc_low, auc_high)) in expected.items():
        row = table.loc[method]
        assert row["final_loss_mean"] == pytest.approx(mean, rel=1e-9)
        assert (row["final_loss_low"], row["final_loss_high"]) == pytest.approx((low, high), rel=1e-9)
        assert (row["auc_loss_mean"], row["auc_loss_low"], row["auc_loss_high"]) == pytest.approx(
            (auc, auc_low, auc_high), rel=1e-9)
        assert row["primary_metric"] == "loss" and row["better"] == "lower" and row["seeds"] == 2
    # lower is better: the table is sorted ascending and position 1 has the smallest error
    assert list(table["final_loss_mean"]) == sorted(table["final_loss_mean"])
    assert table["position"].iloc[0] == 1
    page = html.read_text()
    assert "Ranking (loss, lower is better)" in page and "l2init:strength=0.01" in page
    assert (out / "ranking_runs.csv").exists()


def test_rank_only_with_higher_is_better_metric_reverses_the_order(tmp_path):
    out = tmp_path / "cmp"
    base = [*TOY_ARGS, "--methods", "sgd,noisy_sgd:sigma0=0.3:decay=1.0", "--out", str(out), "--no-report"]
    assert compare_main(base) == 0
    lower = pd.read_csv(out / "ranking.csv", index_col="method")
    assert compare_main([*base, "--rank-only", "--metric", "loss:higher"]) == 0
    higher = pd.read_csv(out / "ranking.csv", index_col="method")
    assert list(higher.index) == list(reversed(lower.index))
    assert list(higher["final_loss_mean"]) == sorted(higher["final_loss_mean"], reverse=True)
    assert higher["better"].iloc[0] == "higher"


@pytest.mark.parametrize("methods, message", [
    ("sgd,not_a_method", "unknown method 'not_a_method'"),
    ("sgd,cbp:no_such_key=1", "cbp"),
    ("sgd,none", "listed twice"),
])
def test_bad_method_exits_2_before_running(tmp_path, capsys, methods, message):
    out = tmp_path / "cmp"
    assert compare_main([*TOY_ARGS, "--methods", methods, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not out.exists()


def test_bad_seeds_preset_and_set_exit_2(tmp_path, capsys):
    out = tmp_path / "cmp"
    for extra in (["--seeds", "x"], ["--preset", "huge"], ["--set", "no_such_key=1"]):
        args = ["toy", "--methods", "sgd", "--out", str(out), "--no-progress", *extra]
        assert compare_main(args) == 2
    assert not out.exists()
    assert capsys.readouterr().err.count("error: ") == 3


def test_method_list_aliases_combinations_and_seeds():
    entries = parse_method_list("sgd, SNP ,cbp+l2init,l2init:strength=0.1")
    assert [e.label for e in entries] == ["sgd", "shrink_perturb", "cbp+l2init", "l2init:strength=0.1"]
    assert [e.specs for e in entries] == [(), ("shrink_perturb",), ("cbp", "l2init"), ("l2init:strength=0.1",)]
    with pytest.raises(ConfigError, match="empty"):
        parse_method_list(" , ")
    assert parse_seeds("3") == [0, 1, 2]
    assert parse_seeds(2) == [0, 1]
    assert parse_seeds("4,7") == [4, 7]
    assert parse_seeds("10-12") == [10, 11, 12]
    for bad in ("0", "1,1", "-3", "a-b"):
        with pytest.raises(ConfigError):
            parse_seeds(bad)


# ----------------------------------------------------------------------------- ranking table vs report summary
def _store_of(folder, runs: pd.DataFrame, metrics: pd.DataFrame) -> None:
    """Write synthetic runs and their rows into a real ResultStore (run ids are the store's)."""
    with ResultStore(folder) as store:
        for _, run in runs.iterrows():
            record = store.start_run(run["benchmark"], run["method"], json.loads(run["config_json"]), int(run["seed"]))
            rows = metrics[metrics["run_id"] == run["run_id"]].to_dict("records")
            store.commit_chunk(record.run_id, rows, None, max(int(r["step"]) for r in rows))
            store.finish_run(record.run_id)


@pytest.mark.parametrize("final_fraction", [0.1, 0.5])
def test_summary_table_and_ranking_give_the_same_values_and_name_the_layers(tmp_path, final_fraction):
    """Same runs -> the report's summary cell equals the ranking's cell for the primary metric and every diagnostic.

    The synthetic rows record effective_rank and duplicate_fraction on two layers (act1 and fc1) and online_mse
    per step with tasks, the two ways the tables used to differ (all layers vs representation layers; per-task
    values vs per-step values).
    """
    from lopkit.report.build import build_report

    runs, metrics = _synthetic()
    _store_of(tmp_path, runs, metrics)
    stored_runs, stored_metrics = _store_frames(tmp_path)
    ranking = ranking_table(stored_runs, stored_metrics, final_fraction=final_fraction)
    report = build_report(tmp_path, tmp_path / "report.html", final_fraction=final_fraction)
    formatted = ranking.formatted()
    pairs = {"online_mse": "final online_mse ↓", "dead_fraction": "dead fraction",
             "duplicate_fraction": "duplicate fraction", "effective_rank": "effective rank"}
    assert set(report.summary.index) == set(formatted.index) == {"sgd", "cbp", "l2init"}
    for method in formatted.index:
        for summary_column, ranking_column in pairs.items():
            assert report.summary.loc[method, summary_column] == formatted.loc[method, ranking_column], (
                method, summary_column)
        # and both equal an independent act1-only computation (fc1 rows are not averaged in)
        ids = stored_runs.loc[stored_runs["method"] == method, "run_id"]
        act1 = stored_metrics[stored_metrics["run_id"].isin(ids) & (stored_metrics["layer"] == "act1")
                              & (stored_metrics["metric"] == "effective_rank")]
        finals = [g.loc[g["step"] >= g["step"].max() - final_fraction * (g["step"].max() - g["step"].min()),
                        "value"].mean()
                  for _, g in act1.groupby("run_id")]
        assert ranking.table.loc[method, "effective_rank_mean"] == pytest.approx(np.mean(finals), rel=1e-12)
    page = (tmp_path / "report.html").read_text()
    assert "layer metrics over act1" in page  # the summary names the layer it averages
    assert "layers act1" in ranking.caption()


def test_a_method_the_benchmark_refuses_is_skipped_and_the_grid_goes_on(tmp_path, capsys):
    """proper_adam on the SGD toy benchmark: one error line, its seeds not tried, the other methods run and rank."""
    out = tmp_path / "cmp"
    code = compare_main([*TOY_ARGS, "--methods", "proper_adam,sgd", "--out", str(out), "--no-report"])
    captured = capsys.readouterr()
    assert code == 1  # the user asked for a method that did not run
    assert captured.err.count("proper_adam cannot run here, skipped") == 1
    assert "Traceback" not in captured.err
    runs, _ = _store_frames(out)
    assert sorted(runs["method"].unique()) == ["sgd"] and set(runs["status"]) == {"finished"} and len(runs) == 2
    ranking = pd.read_csv(out / "ranking.csv")
    assert list(ranking.iloc[:, 0]) == ["sgd"]  # the methods that ran are still ranked


def test_partial_grid_note_says_how_partial_a_grid_is():
    from lopkit.report.ranking import partial_grid_note

    def grid(seeds_per_method):
        return pd.DataFrame([{"method": m, "seed": s} for m, n in seeds_per_method.items() for s in range(n)])

    assert partial_grid_note(grid({"sgd": 3, "cbp": 3})) == []  # complete: nothing to say
    lines = partial_grid_note(grid({"sgd": 3, "cbp": 2, "l2": 3}))
    assert lines[-1] == "" and len(lines) == 2
    assert lines[0].startswith("**Partial grid:** 2-3 finished seeds per method") and "0 started cell(s)" in lines[0]
    failed = pd.DataFrame([{"method": "batchnorm", "seed": 0,
                            "error": "Traceback (most recent call last):\n  ...\nValueError: Expected more than 1 value\n"}])
    lines = partial_grid_note(grid({"sgd": 3, "cbp": 3}), failed=failed)  # complete grid plus a method that failed
    assert lines == ["**Failed cells (not in the table):** batchnorm seed 0 (ValueError: Expected more than 1 value).",
                     ""]
    lines = partial_grid_note(grid({"sgd": 4, "cbp": 4}), unfinished=2)  # same seeds, but cells unfinished
    assert lines[0].startswith("**Partial grid:** 4-4 finished") and "2 started cell(s) unfinished" in lines[0]
