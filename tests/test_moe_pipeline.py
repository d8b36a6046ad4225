"""The MoE-PHDS pipeline end to end (smoke preset), resume of a fine-tune stage, agreement, targets and the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lopkit.configs import ConfigError
from lopkit.moe import evaluate as E
from lopkit.moe import pipeline as P
from lopkit.moe import data as D
from lopkit.moe import report as R
from lopkit.moe.train import MoEFinetune
from lopkit.runner.execute import execute_run
from lopkit.runner.store import ResultStore

@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The whole smoke pipeline, run once for the module (1 thread, see conftest)."""
    out = tmp_path_factory.mktemp("moe_smoke")
    result = P.run_pipeline(out, "smoke", [0], {}, progress=False, log=None)
    return result, None


def test_smoke_pipeline_runs_every_stage(smoke):
    result, _ = smoke
    labels = ["pretrain", "oracle1", "oracle2", "naive", "phds", "phds_anchor"]
    assert sorted(label for label, _seed in result.run_ids) == sorted(labels)
    with ResultStore(result.out_dir) as store:
        runs = store.runs()
        metrics = store.metrics(benchmark="moe_eval")
    assert (runs["status"] == "finished").all()
    assert sorted(runs.loc[runs["benchmark"] == "moe_eval", "method"]) == sorted(
        ["pretrained", "oracle1", "oracle2", "naive", "phds", "phds_anchor"])
    summary = E.summary_table(metrics)
    assert set(summary["k"]) == {1, 2}
    assert summary[["acc", "acc_norm", "perplexity", "tokens_per_s", "flops_per_token"]].notna().all().all()
    assert ((summary["acc"] >= 0) & (summary["acc"] <= 1)).all()
    # the FLOP proxy grows with k, by the same amount for every model
    flops = summary.groupby("k")["flops_per_token"].agg(["min", "max"])
    assert (flops["min"] == flops["max"]).all() and flops.loc[2, "min"] > flops.loc[1, "min"]
    assert result.report_path is not None and result.report_path.exists()
    html = result.report_path.read_text()
    assert html.count("data:image/png;base64,") >= 4 and "Learned domains" in html
    assert "PASS" in html or "MISS" in html or "no domain above chance" in html


def test_overall_accuracy_is_the_item_weighted_mean_of_the_predictions(smoke):
    result, _ = smoke
    with ResultStore(result.out_dir) as store:
        metrics = store.metrics(benchmark="moe_eval")
    from lopkit.moe.train import cached_items

    for (label, seed, k), predictions in E.prediction_vectors(metrics).items():
        answers = np.array([item.answer for domain in sorted(set(metrics["layer"]) - {"all", "heldout", "model"})
                            if not domain.startswith("layer")
                            for item in cached_items(domain, 12, 0, "test", 64)])
        stored = metrics[(metrics["method"] == label) & (metrics["task"] == k) & (metrics["layer"] == "all")
                         & (metrics["metric"] == "acc")]["value"].item()
        assert stored == pytest.approx(float(np.mean(predictions == answers)))


def test_rerunning_the_pipeline_skips_everything_and_keeps_the_rows(smoke, monkeypatch):
    result, _ = smoke
    with ResultStore(result.out_dir) as store:
        before = len(store.metrics())
    resolved = []
    real_resolve = ResultStore.resolve_run_id

    def counting_resolve(self, benchmark, method, config, seed):
        resolved.append((benchmark, method, seed))
        return real_resolve(self, benchmark, method, config, seed)

    monkeypatch.setattr(ResultStore, "resolve_run_id", counting_resolve)
    again = P.run_pipeline(result.out_dir, "smoke", [0], {}, progress=False, log=None, stages=("pretrain", "finetune",
                                                                                                "evaluate"))
    assert set(again.statuses.values()) == {"skipped"}
    assert again.run_ids == result.run_ids
    # every run's id is resolved once, by the pipeline, and passed on (not again by execute / execute_run)
    assert len(resolved) == len(set(resolved)) == len(again.run_ids) + len(again.eval_run_ids)
    with ResultStore(result.out_dir) as store:
        assert len(store.metrics()) == before


def _finetune_rows(store: ResultStore, run_id: str) -> pd.DataFrame:
    rows = store.metrics(run_id=run_id)[["step", "task", "layer", "metric", "value"]]
    return rows.reset_index(drop=True)


def test_interrupted_finetune_resumes_to_the_same_rows(smoke, tmp_path):
    result, _ = smoke
    pre_id = result.run_ids[("pretrain", 0)]
    variant = P.finetune_variants(2)["phds_anchor"]
    config = MoEFinetune.make_config("smoke", {**variant, "init_store": str(result.out_dir), "init_run_id": pre_id,
                                               "anchor_fraction": 0.5})
    with ResultStore(tmp_path / "straight") as store:
        straight = execute_run(store, MoEFinetune, config, 0, progress=False, label="phds_anchor",
                               keep_checkpoint=True)
        rows_straight = _finetune_rows(store, straight.run_id)
        state_straight = store.load_checkpoint(straight.run_id)[1]
    with ResultStore(tmp_path / "resumed") as store:
        paused = execute_run(store, MoEFinetune, config, 0, progress=False, label="phds_anchor", checkpoint_every=2,
                             stop_after_steps=5, keep_checkpoint=True)
        assert paused.status == "paused" and paused.step == 5
    with ResultStore(tmp_path / "resumed") as store:  # a fresh process would do the same: new store, new benchmark
        resumed = execute_run(store, MoEFinetune, config, 0, progress=False, label="phds_anchor",
                              keep_checkpoint=True)
        assert resumed.status == "finished" and resumed.resumed_from == 5
        rows_resumed = _finetune_rows(store, resumed.run_id)
        state_resumed = store.load_checkpoint(resumed.run_id)[1]
    pd.testing.assert_frame_equal(rows_straight, rows_resumed)
    for key, value in state_straight["best_model"].items():
        assert torch.equal(value, state_resumed["best_model"][key])
    # the curriculum ends at delta(k_anchor): the last sampled k is the anchor
    sampled = rows_straight[rows_straight["metric"] == "sampled_k"]
    assert sampled["value"].iloc[-1] == variant["anchor_k"]
    assert sampled["value"].isin(list(variant["k_train"])).all()
    assert set(rows_straight["metric"]) >= {"train_loss", "val_acc", "selected_step"}


def test_finetune_stage_without_pretrain_names_the_command_to_run(tmp_path):
    with pytest.raises(ConfigError, match="lopkit moe pretrain"):
        P.run_pipeline(tmp_path, "smoke", [0], {}, stages=("finetune",), log=None)


def test_overrides_are_routed_to_stages_and_unknown_ones_rejected():
    routed = P.split_overrides({"pretrain.steps": 5, "lr": 1e-3, "eval.test_items": 3})
    assert routed["pretrain"] == {"steps": 5, "lr": 1e-3}
    assert routed["finetune"] == {"lr": 1e-3}
    assert routed["eval"] == {"test_items": 3}
    with pytest.raises(ConfigError, match="no field of any moe stage"):
        P.split_overrides({"learning_rate": 1})
    with pytest.raises(ConfigError, match="prefix"):
        P.split_overrides({"model.steps": 1})


def test_variants_follow_k_pre():
    variants = P.finetune_variants(4)
    assert list(variants) == ["oracle1", "oracle2", "oracle3", "oracle4", "naive", "phds", "phds_anchor"]
    assert variants["phds_anchor"]["k_train"] == (2, 3, 4) and variants["phds_anchor"]["anchor_k"] == 3
    assert variants["naive"]["k_fixed"] == 2 and variants["naive"]["routing"] == "hard"
    assert len(P.finetune_variants(4, ablations=True)) == 9
    assert P.finetune_variants(4, True)["phds_anchor_eps0"]["eps"] == 0.0


# ------------------------------------------------------------------------------------------- agreement & targets


def test_agreement_matrix_matches_brute_force():
    rng = np.random.default_rng(0)
    predictions = {k: rng.integers(0, 4, size=50) for k in (1, 2, 3)}
    matrix = E.agreement_matrix(predictions)
    for a in predictions:
        for b in predictions:
            expected = sum(int(x == y) for x, y in zip(predictions[a], predictions[b])) / 50
            assert matrix.loc[a, b] == pytest.approx(expected)
    assert np.allclose(np.diag(matrix), 1.0) and np.allclose(matrix, matrix.T)
    with pytest.raises(ValueError):
        E.agreement([1, 2], [1])


def test_oracle_predictions_take_each_oracle_at_its_own_k():
    vectors = {("oracle2", 0, 2): np.array([1]), ("oracle2", 0, 4): np.array([2]), ("oracle4", 0, 4): np.array([3]),
               ("phds", 0, 2): np.array([4]), ("oracle4", 1, 4): np.array([5])}
    found = E.oracle_predictions(vectors, 0)
    assert set(found) == {2, 4} and found[2][0] == 1 and found[4][0] == 3


def _summary(values: dict[tuple[str, int], float]) -> pd.DataFrame:
    return pd.DataFrame([{"model": m, "seed": 0, "k": k, "acc": v} for (m, k), v in values.items()])


def test_target_table_pass_and_miss_follow_the_definitions():
    acc = {("pretrained", 4): 0.50, ("pretrained", 3): 0.49, ("pretrained", 2): 0.45, ("pretrained", 1): 0.30,
           ("phds_anchor", 2): 0.47, ("phds_anchor", 3): 0.48, ("phds_anchor", 4): 0.40,
           ("oracle2", 2): 0.475, ("oracle3", 3): 0.47, ("oracle4", 4): 0.50, ("oracle4", 2): 0.44}
    agree = {("phds_anchor", 0): pd.DataFrame([[1, 0.9], [0.9, 1]], index=[2, 4], columns=[2, 4]),
             ("oracles", 0): pd.DataFrame([[1, 0.75], [0.75, 1]], index=[2, 4], columns=[2, 4])}
    table = R.target_table(_summary(acc), agree, 4, {"a": 60.0}, "mini").set_index("target")
    status = table["status"].to_dict()
    assert status["pretrained: acc(k=3) >= 97% of acc(k=4)"] == "PASS"  # 0.98
    assert status[[t for t in status if "drops sharply" in t][0]] == "PASS"  # 40 % drop vs 2 %
    assert status["phds_anchor@2 within ~1 point of oracle2@2 (or better)"] == "PASS"  # -0.5 point
    assert status["phds_anchor@3 within ~1 point of oracle3@3 (or better)"] == "PASS"  # better
    assert status["phds_anchor@4 within ~1 point of oracle4@4 (or better)"] == "MISS"  # -10 points
    assert status["phds_anchor@2 beats oracle4@2 (mis-specified)"] == "PASS"
    agreement_row = table.loc["A_phds_anchor(2,4) > A_oracle(oracle2@2, oracle4@4)"]
    assert agreement_row["status"] == "PASS"
    assert "+15 points absolute" in agreement_row["measured"] and "20 % relative" in agreement_row["measured"]
    gains = R.agreement_summary(agree, 2, 4).set_index("model")
    assert gains.loc["phds_anchor", "gain_abs_points"] == pytest.approx(15.0)
    assert gains.loc["phds_anchor", "gain_rel_percent"] == pytest.approx(20.0)


# ------------------------------------------------------------------------------------------------------- CLI


def test_cli_reports_bad_input_as_one_error_line(tmp_path, capsys):
    from lopkit.moe.cli import main

    assert main(["run", "--preset", "smoke", "--out", str(tmp_path), "--set", "bogus_field=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "bogus_field" in err[0]
    assert main(["finetune", "--preset", "smoke", "--out", str(tmp_path / "empty")]) == 2
    assert "lopkit moe pretrain" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nothing")]) == 2


# ------------------------------------------------------------------------------------------- issue 18 checks


def test_phds_anchor_has_its_own_k_stream_and_is_selected_after_its_anchor_phase(smoke):
    result, _ = smoke
    with ResultStore(result.out_dir) as store:
        rows = {label: _finetune_rows(store, result.run_ids[(label, 0)]) for label in ("phds", "phds_anchor")}
    config = MoEFinetune.make_config("smoke", {"init_store": "x", "init_run_id": "x"})
    n_anchor = max(1, round(config.anchor_fraction * config.steps))
    before = {label: r.loc[r["metric"] == "sampled_k", "value"].tolist()[: config.steps - n_anchor]
              for label, r in rows.items()}
    assert len(before["phds"]) == config.steps - n_anchor >= 8
    assert before["phds"] != before["phds_anchor"]  # same q_t before the anchor phase, different draws
    selected = {label: r.loc[r["metric"] == "selected_step", "value"].item() for label, r in rows.items()}
    assert selected["phds_anchor"] == config.steps
    anchor_selection = rows["phds_anchor"][(rows["phds_anchor"]["metric"] == "val_acc")]
    assert set(anchor_selection["step"]) == {config.steps}


def test_learning_curves_have_a_row_per_domain(smoke):
    result, _ = smoke
    with ResultStore(result.out_dir) as store:
        metrics = store.metrics()
    curves = R.learning_curves(metrics)
    assert set(curves.columns) == {*D.MC_DOMAINS, "seeds"}
    assert (curves["seeds"] == 1).all()  # one seed: every row's mean is over that one run
    assert set(curves.index.get_level_values("stage")) == {"pretrain", "finetune"}
    pretrain = curves.loc["pretrain"]
    assert len(pretrain) >= 2 and pretrain.notna().all().all()


def test_learning_curves_count_the_seeds_behind_each_mean():
    rows = [{"run_id": run, "benchmark": "moe_pretrain", "method": "pretrain", "step": step, "layer": domain,
             "metric": "val_acc", "value": value}
            for run, steps, value in (("a", (100, 200, 300), 0.4), ("b", (100, 200), 0.6))  # b is still running
            for step in steps for domain in ("arithmetic", "reversal")]
    curves = R.learning_curves(pd.DataFrame(rows)).loc["pretrain"].loc["pretrain"]
    assert curves["seeds"].tolist() == [2, 2, 1]
    assert curves["arithmetic"].tolist() == pytest.approx([0.5, 0.5, 0.4])


def test_chance_level_domain_is_reported_and_excluded_from_the_targets():
    rows = []
    for model, k, good, chance in [("oracle4", 4, 0.80, 0.26), ("pretrained", 4, 0.70, 0.25),
                                   ("pretrained", 3, 0.69, 0.24), ("pretrained", 1, 0.30, 0.27)]:
        rows.append({"model": model, "seed": 0, "k": k, "acc:arith": good, "acc:cloze": chance,
                     "acc": (good + chance) / 2})
    summary = pd.DataFrame(rows)
    learned = R.learned_domains(summary, {"arith": 300, "cloze": 300}, 4).set_index("domain")
    assert learned.loc["arith", "learned"] and not learned.loc["cloze", "learned"]
    assert learned.loc["cloze", "reference"] == "oracle4@4"
    with_learned = R.with_learned_accuracy(summary, ["arith"])
    assert with_learned["acc_learned"].tolist() == summary["acc:arith"].tolist()
    table = R.target_table(with_learned, {}, 4, {}, "mini", column="acc_learned").set_index("target")
    keep = table.loc["pretrained: acc(k=3) >= 97% of acc(k=4)"]
    assert "0.69 / 0.7" in keep["measured"] and keep["status"] == "PASS"  # 0.9857, not the pooled 0.465/0.475
    # just above / below the 3-s.e. threshold with 300 items: 0.25 + 3 * sqrt(0.1875 / 300) = 0.325
    edge = pd.DataFrame([{"model": "oracle4", "seed": 0, "k": 4, "acc:a": 0.33, "acc:b": 0.32}])
    flags = R.learned_domains(edge, {"a": 300, "b": 300}, 4).set_index("domain")["learned"]
    assert flags["a"] and not flags["b"]


def test_seed_agreement_control_matches_brute_force():
    rng = np.random.default_rng(1)
    preds = {(seed, k): rng.integers(0, 4, size=20) for seed in (0, 1, 2) for k in (2, 4)}
    rows = [{"benchmark": "moe_eval", "metric": "pred", "method": "phds", "seed": seed, "task": k,
             "layer": "arith", "step": i, "value": int(v)}
            for (seed, k), vector in preds.items() for i, v in enumerate(vector)]
    pairs = E.seed_agreement(pd.DataFrame(rows))
    assert len(pairs) == 6  # 3 seed pairs x 2 ks
    for row in pairs.itertuples():
        expected = float(np.mean(preds[(row.seed_a, row.k)] == preds[(row.seed_b, row.k)]))
        assert row.A == pytest.approx(expected)


def test_dial_cli_on_a_lopkit_experiment_folder(smoke, tmp_path, capsys):
    from lopkit.moe.cli import main

    result, _ = smoke
    text = tmp_path / "text.txt"
    text.write_text("reverse: stone -> enots\n12+30 = 42\n" * 20)
    assert main(["dial", str(result.out_dir), "--k", "1,2", "--text", str(text), "--context", "32"]) == 0
    out = capsys.readouterr().out
    assert "(lopkit), k_pre=2" in out and out.count("\n| 1 |") == 1 and out.count("\n| 2 |") == 1
    assert "| 2 | " in out and out.strip().splitlines()[-1].split("|")[3].strip() == "1"  # k_pre agrees with itself


def test_results_block_of_an_unfinished_experiment_judges_no_target(smoke, tmp_path):
    """scripts/moe_results_md.py on a store with one run not finished: targets are shown as partial, not judged."""
    import shutil
    import sqlite3
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import moe_results_md

    result, _ = smoke
    figure = tmp_path / "figs" / "acc.png"
    finished = moe_results_md.markdown([Path(result.out_dir)], figure=figure)
    assert "Not judged yet" not in finished and "| status |" in finished
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    copy = tmp_path / "partial"
    shutil.copytree(result.out_dir, copy)
    with sqlite3.connect(copy / "results.sqlite") as conn:
        conn.execute("UPDATE runs SET status = 'running' WHERE run_id = (SELECT run_id FROM runs LIMIT 1)")
    partial = moe_results_md.markdown([copy])
    assert "Not judged yet: 1 started run(s) are unfinished" in partial and "| status (partial) |" in partial


def _add_timings(out_dir: str, key: str, times: int) -> None:
    """Worker for the parallel-timings test: ``times`` one-second additions to ``key``."""
    from lopkit.moe.pipeline import _Timings

    timings = _Timings(Path(out_dir))
    for _ in range(times):
        timings.add(key, 1.0)


def test_stage_timings_of_parallel_processes_keep_each_others_entries(tmp_path):
    """Two processes timing stages of one experiment (e.g. fine-tunes split over two workers) lose no entry."""
    import json
    import multiprocessing

    from lopkit.moe.common import TIMINGS_FILE
    from lopkit.moe.pipeline import _Timings

    first, second = _Timings(tmp_path), _Timings(tmp_path)  # both read the file before either writes
    first.add("oracle1/seed2", 10.0)
    second.add("phds/seed2", 20.0)
    assert json.loads((tmp_path / TIMINGS_FILE).read_text()) == {"oracle1/seed2": 10.0, "phds/seed2": 20.0}
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_add_timings, args=(str(tmp_path), key, 40)) for key in ("a", "a", "b")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    saved = json.loads((tmp_path / TIMINGS_FILE).read_text())
    assert saved == {"oracle1/seed2": 10.0, "phds/seed2": 20.0, "a": 80.0, "b": 40.0}


def test_paired_difference_matches_a_brute_force_count():
    """diff and its two standard errors, checked against plain loops over seeds, domains and items."""
    rng = np.random.default_rng(3)
    sizes = {"arith": 40, "cloze": 25}
    correct = {(model, seed, 2): {d: rng.integers(0, 2, size=n).astype(float) for d, n in sizes.items()}
               for model in ("phds_anchor", "oracle2") for seed in (0, 1, 2)}
    found = R.paired_difference(correct, ("phds_anchor", 2), ("oracle2", 2), ["arith", "cloze"])
    per_seed = []
    for seed in (0, 1, 2):
        accs = [sum(correct[("phds_anchor", seed, 2)][d]) / n - sum(correct[("oracle2", seed, 2)][d]) / n
                for d, n in sizes.items()]
        per_seed.append(sum(accs) / 2)
    assert found["diff"] == pytest.approx(sum(per_seed) / 3)
    mean = sum(per_seed) / 3
    assert found["se_seeds"] == pytest.approx((sum((x - mean) ** 2 for x in per_seed) / 2 / 3) ** 0.5)
    item_var = 0.0
    for d, n in sizes.items():
        per_item = [sum(correct[("phds_anchor", s, 2)][d][i] - correct[("oracle2", s, 2)][d][i] for s in (0, 1, 2)) / 3
                    for i in range(n)]
        centre = sum(per_item) / n
        item_var += sum((x - centre) ** 2 for x in per_item) / (n - 1) / n
    assert found["se_items"] == pytest.approx((item_var / 4) ** 0.5)
    assert found["seeds"] == 3 and found["z"] == pytest.approx(found["diff"] / found["se"])


def test_paired_table_separates_a_clear_gap_and_not_a_tie():
    """A model right on every item where the other is wrong on half is 'better'; a copy is not separated."""
    truth = np.ones(200)
    half = np.tile([1.0, 0.0], 100)
    correct = {}
    for seed in (0, 1):
        correct[("phds_anchor", seed, 2)] = {"arith": truth}
        correct[("oracle2", seed, 2)] = {"arith": half}
        correct[("phds", seed, 2)] = {"arith": truth}
    table = R.paired_difference_table(correct, ["arith"], 2).set_index("B")
    assert table.loc["oracle2@2", "verdict"] == "phds_anchor@2 better"
    assert table.loc["oracle2@2", "diff_points"] == pytest.approx(50.0)
    assert table.loc["phds@2", "verdict"] == "not separated" and table.loc["phds@2", "diff_points"] == 0
    assert "naive@2" not in table.index  # models that were not evaluated are left out


def test_rebuilt_test_answers_reproduce_the_stored_accuracy(smoke, tmp_path):
    """The report rebuilds each test item's answer from the eval config; a changed prediction is caught."""
    import shutil
    import sqlite3

    result, _ = smoke
    with ResultStore(result.out_dir) as store:
        runs, metrics = store.runs(), store.metrics(benchmark="moe_eval")
    answers, note = E.rebuild_test_answers(runs)
    assert answers is not None and "data_seed=0" in note
    correct = E.item_correctness(metrics, answers)
    assert ("phds_anchor", 0, 1) in correct and set(correct[("phds_anchor", 0, 1)]) == set(answers)
    copy = tmp_path / "changed"
    shutil.copytree(result.out_dir, copy)
    with sqlite3.connect(copy / "results.sqlite") as conn:  # one prediction flipped between right and wrong
        rowid, domain, index, value = conn.execute(
            "SELECT rowid, layer, step, value FROM metrics WHERE metric = 'pred' LIMIT 1").fetchone()
        answer = int(answers[domain][int(index)])
        conn.execute("UPDATE metrics SET value = ? WHERE rowid = ?",
                     (float(answer if int(value) != answer else (answer + 1) % 2), rowid))
    with ResultStore(copy) as store:
        changed = store.metrics(benchmark="moe_eval")
    with pytest.raises(ValueError, match="do not reproduce the stored"):
        E.item_correctness(changed, answers)


def test_report_merges_the_stores_of_several_folders(smoke, tmp_path, capsys):
    """`lopkit moe report A B -o F`: one report over one store per seed; several folders without -o is one error line."""
    import shutil
    import sqlite3

    from lopkit.moe.cli import main

    result, _ = smoke
    other = tmp_path / "seed1"
    shutil.copytree(result.out_dir, other)
    with sqlite3.connect(other / "results.sqlite") as conn:  # the copy stands for a second seed's store
        conn.execute("UPDATE runs SET seed = 1")
    runs, metrics, timings = R.load_stores([result.out_dir, other])
    assert sorted(runs["seed"].unique()) == [0, 1] and len(runs) == 2 * len(R.load_stores([other])[0])
    assert timings and all(key.split("/")[0] in (Path(result.out_dir).name, "seed1") for key in timings)
    merged = tmp_path / "merged" / "report.html"
    assert main(["report", str(result.out_dir), str(other), "-o", str(merged)]) == 0
    html = merged.read_text()
    assert "Results stores:" in html and str(other) in html and "Agreement control" in html
    control = pd.read_csv(merged.parent / "moe_figures" / "agreement_seed_control.csv", index_col=0)
    assert (control.to_numpy() == 1.0).all()  # the two "seeds" are copies: they agree on every item
    capsys.readouterr()
    assert main(["report", str(result.out_dir), str(other)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--output" in err[0]
    assert main(["report", str(tmp_path / "missing")]) != 0
    assert "no results store" in capsys.readouterr().err
