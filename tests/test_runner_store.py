"""ResultStore: WAL mode, concurrent writers, atomic chunk commits, DataFrames, run ids and checkpoints.

numpy and torch are imported inside the tests that need them: the spawned writer processes import this
module, and the store itself needs neither, so they start fast.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import sqlite3
import subprocess
import time

import pytest

from lopkit.runner import store as store_module
from lopkit.runner.store import (
    ResultStore,
    canonical_config_json,
    code_version,
    deserialize_state,
    make_run_id,
    serialize_state,
    store_path,
)

RUN_COLUMNS = ["run_id", "benchmark", "preset", "method", "seed", "config_json", "code_version", "status", "error",
               "created_at", "updated_at", "step", "total_steps", "pid", "host"]
METRIC_COLUMNS = ["run_id", "benchmark", "preset", "method", "seed", "step", "task", "layer", "metric", "value"]


def chunk_rows(worker: int, chunk: int, per_chunk: int) -> list[dict]:
    """Rows whose values encode (worker, chunk, index) so the reader can check every one came back intact."""
    return [
        {"step": chunk + 1, "task": chunk // 5, "layer": f"l{i % 3}", "metric": "m", "value": worker * 1e6 + chunk * 1e3 + i}
        for i in range(per_chunk)
    ]


def concurrent_writer(path: str, worker: int, chunks: int, per_chunk: int, start) -> None:
    """Process body: register one run and commit ``chunks`` chunks (rows + checkpoint) as fast as possible."""
    store = ResultStore(path)
    record = store.start_run("bench", "sgd", {"worker": worker}, seed=worker, preset="smoke", total_steps=chunks)
    start.wait(60)  # both processes are connected and registered: now write at the same time
    for chunk in range(chunks):
        state = json.dumps({"chunk": chunk, "weights": [float(chunk)] * 64}).encode()
        store.commit_chunk(record.run_id, chunk_rows(worker, chunk, per_chunk), state, chunk + 1)
        time.sleep(0.005)  # leave the other writer room, so that the two processes' commits interleave
    store.finish_run(record.run_id, keep_checkpoint=True)
    store.close()


def test_wal_mode_busy_timeout_and_tables(tmp_path):
    store = ResultStore(tmp_path / "exp")
    assert store.path == store_path(tmp_path / "exp") == tmp_path / "exp" / "results.sqlite"
    assert store.conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 10_000
    store.close()
    with sqlite3.connect(tmp_path / "exp" / "results.sqlite") as conn:  # WAL is a property of the file
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        columns = [row[1] for row in conn.execute("PRAGMA table_info(runs)")]
    assert {"runs", "metrics", "checkpoints"} <= tables
    assert any("metrics" in name for name in indexes)
    assert columns == RUN_COLUMNS
    # a path ending in .sqlite is used as the file itself
    direct = ResultStore(tmp_path / "other.sqlite")
    assert direct.path == tmp_path / "other.sqlite"
    direct.close()
    direct.close()  # idempotent


def test_two_processes_write_into_one_file_concurrently(tmp_path):
    path = str(tmp_path / "shared")
    chunks, per_chunk = 40, 25
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    workers = [ctx.Process(target=concurrent_writer, args=(path, w, chunks, per_chunk, start)) for w in (1, 2)]
    for process in workers:
        process.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until both runs are registered, then release them together
        # mode=ro: polling must not create an empty file (a 0-byte results.sqlite counts as damaged)
        with contextlib.suppress(sqlite3.OperationalError), \
                sqlite3.connect(f"file:{path}/results.sqlite?mode=ro", uri=True) as conn:
            if conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 2:
                break
        time.sleep(0.02)
    start.set()
    for process in workers:
        process.join(90)
    assert [p.exitcode for p in workers] == [0, 0]

    store = ResultStore(path)
    runs = store.runs()
    assert sorted(runs["seed"]) == [1, 2] and set(runs["status"]) == {"finished"}
    assert list(runs["step"]) == [chunks, chunks]
    metrics = store.metrics()
    assert len(metrics) == 2 * chunks * per_chunk
    with sqlite3.connect(store.path) as conn:  # the commits really were concurrent: the writers interleaved
        order = [row[0] for row in conn.execute("SELECT run_id FROM metrics ORDER BY rowid")]
    assert sum(a != b for a, b in zip(order, order[1:])) >= 2
    for worker in (1, 2):
        run_id = runs.loc[runs["seed"] == worker, "run_id"].item()
        got = store.metrics(run_id=run_id)
        expected = [r["value"] for c in range(chunks) for r in chunk_rows(worker, c, per_chunk)]
        assert got["value"].tolist() == expected  # every row, in commit order, none from the other worker
        step, raw = store.load_checkpoint_bytes(run_id)
        assert step == chunks and json.loads(raw) == {"chunk": chunks - 1, "weights": [float(chunks - 1)] * 64}
    store.close()


def test_dataframe_columns_dtypes_and_nan(tmp_path):
    import numpy as np

    store = ResultStore(tmp_path)
    config = {"width": 5, "lr": 0.1, "sizes": [1, 2]}
    record = store.start_run("toy", "cbp", config, seed=3, preset="smoke", total_steps=10)
    rows = [
        {"step": 2, "task": 0, "layer": "model", "metric": "loss", "value": 0.5},
        {"step": 2, "task": 0, "layer": "act1", "metric": "effective_rank", "value": float("nan")},
        {"step": 4, "task": 1, "layer": "model", "metric": "loss", "value": float("inf")},
    ]
    store.commit_chunk(record.run_id, rows, serialize_state({"a": 1}), 4)
    runs = store.runs()
    assert list(runs.columns) == RUN_COLUMNS + ["stored_status"]
    row = runs.iloc[0]
    assert (row["benchmark"], row["method"], row["preset"], row["seed"], row["status"]) == ("toy", "cbp", "smoke", 3, "running")
    assert (row["step"], row["total_steps"]) == (4, 10)
    assert json.loads(row["config_json"]) == config
    assert row["code_version"].startswith(__import__("lopkit").__version__)

    metrics = store.metrics()
    assert list(metrics.columns) == METRIC_COLUMNS
    assert metrics["value"].dtype == np.float64 and metrics["step"].dtype == np.int64
    assert metrics["metric"].tolist() == ["loss", "effective_rank", "loss"]
    assert metrics["value"].iloc[0] == 0.5 and math.isnan(metrics["value"].iloc[1]) and metrics["value"].iloc[2] == math.inf
    assert set(metrics["benchmark"]) == {"toy"} and set(metrics["method"]) == {"cbp"} and set(metrics["seed"]) == {3}
    assert store.metrics(metric="loss")["step"].tolist() == [2, 4]
    assert store.metrics(layer=["act1"])["metric"].tolist() == ["effective_rank"]
    assert store.metrics(run_id="nope").empty and list(store.metrics(run_id="nope").columns) == METRIC_COLUMNS
    store.close()


def test_commit_chunk_is_atomic(tmp_path):
    store = ResultStore(tmp_path)
    run_id = store.start_run("toy", "sgd", {"x": 1}, seed=0).run_id
    store.commit_chunk(run_id, [{"step": 1, "task": 0, "layer": "model", "metric": "loss", "value": 1.0}],
                       serialize_state({"step": 1}), 1)
    # make the checkpoint write fail inside the transaction, after the rows were inserted
    store.conn.execute(
        "CREATE TEMP TRIGGER fail_checkpoint BEFORE UPDATE ON checkpoints BEGIN SELECT RAISE(ABORT, 'disk full'); END"
    )
    new_rows = [{"step": 2, "task": 0, "layer": "model", "metric": "loss", "value": v} for v in (2.0, 3.0)]
    with pytest.raises(sqlite3.DatabaseError, match="disk full"):
        store.commit_chunk(run_id, new_rows, serialize_state({"step": 2}), 2)
    store.conn.execute("DROP TRIGGER fail_checkpoint")
    assert store.metrics()["value"].tolist() == [1.0]  # the new rows were rolled back with the checkpoint
    assert store.load_checkpoint(run_id)[0] == 1 and store.get_run(run_id)["step"] == 1
    # and a chunk that does commit writes both
    store.commit_chunk(run_id, new_rows, serialize_state({"step": 2}), 2)
    assert store.metrics()["value"].tolist() == [1.0, 2.0, 3.0]
    assert store.load_checkpoint(run_id) == (2, {"step": 2}) and store.get_run(run_id)["step"] == 2
    store.close()


def test_commit_chunk_rejects_stale_steps_and_finished_runs(tmp_path):
    store = ResultStore(tmp_path)
    run_id = store.start_run("toy", "sgd", {"x": 1}, seed=0).run_id
    row = {"step": 5, "task": 0, "layer": "model", "metric": "loss", "value": 1.0}
    store.commit_chunk(run_id, [row], b"state", 5)
    for step in (5, 4):  # a second writer of the same run would duplicate rows
        with pytest.raises(ValueError, match="another process"):
            store.commit_chunk(run_id, [row], b"state", step)
    store.commit_chunk(run_id, [], b"state", 5)  # an empty chunk at the same step is a harmless no-op
    with pytest.raises(ValueError, match="unknown run"):
        store.commit_chunk("missing", [row], b"state", 9)
    store.finish_run(run_id)
    with pytest.raises(ValueError, match="finished"):
        store.commit_chunk(run_id, [row], b"state", 9)
    assert len(store.metrics()) == 1
    assert store.load_checkpoint(run_id) is None  # dropped at finish
    store.close()


def test_start_run_statuses(tmp_path):
    store = ResultStore(tmp_path)
    first = store.start_run("toy", "sgd", {"b": 2, "a": 1}, seed=1, total_steps=7)
    assert first.is_new and first.status == "running" and first.step == 0
    store.commit_chunk(first.run_id, [], b"s", 3)
    store.fail_run(first.run_id, "Traceback ...\nFloatingPointError: nan")
    failed = store.get_run(first.run_id)
    assert failed["status"] == "failed" and failed["error"].endswith("nan")
    again = store.start_run("toy", "sgd", {"a": 1, "b": 2}, seed=1)  # key order does not matter
    assert (again.run_id, again.is_new, again.status, again.step, again.total_steps) == (first.run_id, False, "failed", 3, 7)
    resumed = store.get_run(first.run_id)
    assert resumed["status"] == "running" and resumed["error"] is None
    store.finish_run(first.run_id)
    done = store.start_run("toy", "sgd", {"a": 1, "b": 2}, seed=1)
    assert done.status == "finished" and store.get_run(first.run_id)["status"] == "finished"
    store.delete_run(first.run_id)
    assert store.get_run(first.run_id) is None and store.runs().empty
    store.close()


def test_run_id_is_a_stable_hash_of_the_identity():
    base = make_run_id("toy", "sgd", {"lr": 0.1, "width": 5}, 0)
    assert len(base) == 16 and int(base, 16) >= 0
    assert make_run_id("toy", "sgd", {"width": 5, "lr": 0.1}, 0) == base
    changed = [
        make_run_id("bitflip", "sgd", {"lr": 0.1, "width": 5}, 0),
        make_run_id("toy", "cbp", {"lr": 0.1, "width": 5}, 0),
        make_run_id("toy", "sgd", {"lr": 0.1, "width": 6}, 0),
        make_run_id("toy", "sgd", {"lr": 0.1, "width": 5}, 1),
    ]
    assert len(set(changed + [base])) == 5
    assert canonical_config_json({"b": (1, 2), "a": 1}) == '{"a":1,"b":[1,2]}'
    # independent computation of the documented recipe
    import hashlib

    identity = json.dumps({"benchmark": "toy", "method": "sgd", "config": {"lr": 0.1, "width": 5}, "seed": 0},
                          sort_keys=True, separators=(",", ":"))
    assert base == hashlib.sha256(identity.encode()).hexdigest()[:16]


def test_checkpoint_round_trip_keeps_tensors_and_rng_states():
    import numpy as np
    import torch

    generator = torch.Generator().manual_seed(5)
    state = {"w": torch.randn(3, 4), "gen": generator.get_state(), "np": np.random.RandomState(1).get_state(),
             "step": 7, "nested": {"x": [1.5, float("inf")]}}
    back = deserialize_state(serialize_state(state))
    assert torch.equal(back["w"], state["w"]) and torch.equal(back["gen"], state["gen"])
    assert back["np"][0] == state["np"][0] and np.array_equal(back["np"][1], state["np"][1])
    assert back["step"] == 7 and back["nested"] == {"x": [1.5, float("inf")]}


def test_code_version_without_git(monkeypatch):
    import lopkit

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    code_version.cache_clear()
    monkeypatch.setattr(store_module.subprocess, "run", no_git)
    try:
        assert code_version() == lopkit.__version__
    finally:
        code_version.cache_clear()
    monkeypatch.setattr(store_module.subprocess, "run", subprocess.run)
    assert code_version().startswith(lopkit.__version__)


# --------------------------------------------------------------------------------- failing safely (issue 12)


def small_store(folder, runs: int = 2, state_bytes: int = 20000) -> None:
    """A real store in ``folder`` with ``runs`` runs, a few rows each and a checkpoint (several pages), closed."""
    with ResultStore(folder) as store:
        for seed in range(runs):
            record = store.start_run("toy", "sgd", {"width": 4}, seed, preset="smoke", total_steps=4)
            store.commit_chunk(record.run_id, chunk_rows(seed, 0, 3), b"x" * state_bytes, 2)
        store.finish_run(record.run_id)


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run ``lopkit ARGV`` in this process; (exit code, stdout, stderr)."""
    from lopkit.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def damage(folder, kind: str) -> None:
    """Put a damaged or foreign results.sqlite into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.sqlite"
    if kind == "garbage":
        path.write_bytes(bytes(range(256)) * 40)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        small_store(folder)
        size = path.stat().st_size
        with open(path, "r+b") as handle:
            handle.truncate(size // 2)
    elif kind == "foreign":  # another program's SQLite database
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute("CREATE TABLE songs (title TEXT)")
            conn.commit()
    else:
        raise ValueError(kind)


@pytest.mark.parametrize("kind", ["garbage", "empty", "truncated", "foreign"])
def test_a_damaged_store_gives_one_line_exit_2_and_stays_untouched(kind, tmp_path, capsys):
    folder = tmp_path / "exp"
    damage(folder, kind)
    path = folder / "results.sqlite"
    before = path.read_bytes()
    expected = f"results.sqlite in {folder} is not a lopkit store or is damaged: "
    for read_only in (False, True):
        with pytest.raises(store_module.StoreError) as info:
            ResultStore(folder, read_only=read_only)
        assert str(info.value).startswith(expected) and str(info.value).endswith("; move it away and rerun")
        assert "\n" not in str(info.value)
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(f"experiment: {folder}\npreset: smoke\nruns:\n  - benchmark: toy\n")
    commands = [
        ["report", str(folder)],
        ["run", "toy", "--preset", "smoke", "--seeds", "1", "--out", str(folder), "--no-progress"],
        ["compare", "toy", "--methods", "sgd", "--seeds", "1", "--preset", "smoke", "--out", str(folder),
         "--no-progress"],
        ["compare", "toy", "--methods", "sgd", "--seeds", "1", "--preset", "smoke", "--out", str(folder), "--rank-only"],
        ["list", str(folder)],
        ["sweep", str(sweep_file), "--backend", "sequential", "--no-progress"],
        ["sweep", str(sweep_file), "--dry-run"],
    ]
    for argv in commands:
        code, _out, err = cli(argv, capsys)
        assert code == 2, (argv, err)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(f"error: {expected}"), (argv, err)
        assert "Traceback" not in err, (argv, err)
        assert path.read_bytes() == before, argv  # byte-identical
    assert sorted(p.name for p in folder.iterdir()) == ["results.sqlite"]  # no -wal/-shm, no report written


def test_a_zero_byte_store_is_not_silently_replaced_but_a_new_folder_is_created(tmp_path):
    with ResultStore(tmp_path / "new") as store:  # no file yet: a new store, as before
        assert store.runs().empty
    assert (tmp_path / "new" / "results.sqlite").stat().st_size > 0
    damage(tmp_path / "zero", "empty")
    with pytest.raises(store_module.StoreError, match="the file is empty"):
        ResultStore(tmp_path / "zero")
    assert (tmp_path / "zero" / "results.sqlite").stat().st_size == 0


def test_reading_with_mode_ro_works_and_writing_gives_the_read_only_error(tmp_path):
    small_store(tmp_path)
    path = tmp_path / "results.sqlite"
    before = path.read_bytes()
    with ResultStore(tmp_path) as store:
        expected_rows = store.metrics()
    with ResultStore(tmp_path, read_only=True) as store:
        assert store.read_only
        assert store.metrics().equals(expected_rows) and len(store.runs()) == 2
        run_id = store.runs()["run_id"].iloc[0]
        for write in (lambda: store.start_run("toy", "sgd", {"width": 9}, 0),
                      lambda: store.commit_chunk(run_id, chunk_rows(0, 1, 2), None, 5),
                      lambda: store.fail_run(run_id, "x")):
            with pytest.raises(store_module.StoreError) as info:
                write()
            message = str(info.value)
            assert message.startswith(f"results.sqlite in {tmp_path} is read-only (") and "\n" not in message
    assert path.read_bytes() == before
    with pytest.raises(FileNotFoundError, match="no results store"):
        ResultStore(tmp_path / "nothing", read_only=True)
    assert not (tmp_path / "nothing").exists()  # reading never creates a folder


def test_readers_create_no_file_next_to_a_closed_store(tmp_path, capsys):
    import shutil

    assert cli(["run", "toy", "--preset", "smoke", "--seeds", "2", "--out", str(tmp_path / "exp"), "--no-progress"],
               capsys)[0] == 0
    with ResultStore(tmp_path / "exp") as store:
        expected_runs, expected_rows = store.runs(), store.metrics()
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy2(tmp_path / "exp" / "results.sqlite", copy / "results.sqlite")
    before = (copy / "results.sqlite").read_bytes()
    with ResultStore(copy, read_only=True) as store:
        assert store.metrics().equals(expected_rows) and len(expected_rows) > 0
        assert list(store.runs()["run_id"]) == list(expected_runs["run_id"])
        assert store.query("SELECT count(*) FROM metrics WHERE run_id = ?", [expected_runs["run_id"].iloc[0]]) == [
            ((expected_rows["run_id"] == expected_runs["run_id"].iloc[0]).sum(),)]
        assert sorted(p.name for p in copy.iterdir()) == ["results.sqlite"]  # no -wal/-shm while reading
    for argv in (["report", str(copy), "-o", str(tmp_path / "report.html")], ["list", str(copy)]):
        assert cli(argv, capsys)[0] == 0, argv
    assert sorted(p.name for p in copy.iterdir()) == ["results.sqlite"]  # nor after
    assert (copy / "results.sqlite").read_bytes() == before


def test_a_reader_opened_before_a_writer_sees_the_writers_rows(tmp_path):
    small_store(tmp_path)
    reader = ResultStore(tmp_path, read_only=True)
    try:
        assert len(reader.metrics()) == 6
        writer = ResultStore(tmp_path)  # a run starts while a report is open
        run_id = writer.start_run("toy", "sgd", {"width": 5}, 0, total_steps=9).run_id
        writer.commit_chunk(run_id, chunk_rows(7, 0, 4), b"state", 1)
        assert len(reader.metrics(run_id=run_id)) == 4 and len(reader.runs()) == 3  # rows still in the -wal
        writer.commit_chunk(run_id, chunk_rows(7, 1, 2), b"state", 2)
        writer.close()
        assert len(reader.metrics(run_id=run_id)) == 6 and reader.get_run(run_id)["step"] == 2
    finally:
        reader.close()
    reader = ResultStore(tmp_path, read_only=True)  # opened on a closed store, written and closed in between
    try:
        with ResultStore(tmp_path) as writer:
            writer.commit_chunk(run_id, chunk_rows(7, 2, 3), b"state", 3)
        assert len(reader.metrics(run_id=run_id)) == 9 and reader.get_run(run_id)["step"] == 3
    finally:
        reader.close()


def test_a_read_only_folder_is_opened_immutable(tmp_path, monkeypatch):
    # as root, chmod does not stop writes; simulate a folder where not even -shm can be created
    small_store(tmp_path)
    with ResultStore(tmp_path) as store:
        expected_rows = store.metrics()
    real_access = store_module.os.access
    monkeypatch.setattr(store_module.os, "access",
                        lambda p, mode: False if str(p).startswith(str(tmp_path)) and mode & store_module.os.W_OK
                        else real_access(p, mode))
    with ResultStore(tmp_path, read_only=True) as store:
        assert store.immutable
        assert store.metrics().equals(expected_rows)
    with ResultStore(tmp_path) as store:  # a plain open falls back to reading; writing: one line
        assert store.read_only and store.metrics().equals(expected_rows)
        with pytest.raises(store_module.StoreError, match="is read-only"):
            store.start_run("toy", "sgd", {"width": 9}, 0)


READ_ONLY_SCRIPT = r"""
import sys
from lopkit.cli import main
from lopkit.runner.store import ResultStore
folder, out = sys.argv[1], sys.argv[2]
print("metrics rows:", len(ResultStore(folder, read_only=True).metrics()))
print("default open rows:", end=" ")
try:
    print(len(ResultStore(folder).metrics()))
except Exception as err:
    print(type(err).__name__, err)
print("report:", main(["report", folder, "-o", out + "/report.html"]))
print("report into the folder:", main(["report", folder]))
print("list:", main(["list", folder]))
print("run:", main(["run", "toy", "--preset", "smoke", "--seeds", "3", "--out", folder, "--no-progress"]))
print("compare:", main(["compare", "toy", "--methods", "sgd", "--seeds", "3", "--preset", "smoke", "--out", folder,
                        "--no-progress"]))
print("rank only:", main(["compare", "toy", "--methods", "sgd", "--seeds", "2", "--preset", "smoke", "--out", folder,
                          "--rank-only", "-o", out + "/ranking/report.html"]))
"""


def test_chmod_read_only_store_can_be_read_for_real(tmp_path, capsys):
    """chmod 555 DIR; chmod 444 DIR/results.sqlite, then read it as a user the permissions apply to."""
    import os
    import shutil
    import sys
    import tempfile
    from pathlib import Path

    root = Path(tempfile.mkdtemp(prefix="lopkit-ro-"))
    try:
        folder, out = root / "exp", root / "out"
        assert cli(["run", "toy", "--preset", "smoke", "--seeds", "2", "--out", str(folder), "--no-progress"],
                   capsys)[0] == 0
        with ResultStore(folder) as store:
            rows = len(store.metrics())
        out.mkdir()
        (root / "home").mkdir()
        os.chmod(folder / "results.sqlite", 0o444)
        os.chmod(folder, 0o555)
        os.chmod(root, 0o755)
        os.chmod(out, 0o777)
        os.chmod(root / "home", 0o777)
        before = (folder / "results.sqlite").read_bytes()
        env = {**os.environ, "HOME": str(root / "home"), "MPLCONFIGDIR": str(root / "home"),
               "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        command = [sys.executable, "-c", READ_ONLY_SCRIPT, str(folder), str(out)]
        if os.geteuid() == 0:  # root ignores permission bits: drop the capabilities that let it
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("running as root without setpriv: permission bits cannot be made to apply")
            command = [setpriv, "--bounding-set", "-dac_override,-dac_read_search,-fowner", *command]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=str(root))
        output = done.stdout + done.stderr
        if done.returncode != 0 and "setpriv" in output:
            pytest.skip(f"setpriv cannot drop capabilities here:\n{output}")
        assert done.returncode == 0, output
        assert f"metrics rows: {rows}" in done.stdout
        assert f"default open rows: {rows}" in done.stdout  # ResultStore(dir).metrics() reads read-only storage
        assert "report: 0" in done.stdout and (out / "report.html").exists()
        assert "report into the folder: 2" in done.stdout and "pass -o" in done.stderr
        assert "list: 0" in done.stdout and "finished" in done.stdout
        assert "run: 2" in done.stdout and "compare: 2" in done.stdout
        assert "rank only: 0" in done.stdout and (out / "ranking" / "ranking.csv").exists()
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 3 and all("is read-only (" in e for e in errors[1:]), done.stderr
        assert "Traceback" not in done.stderr
        assert (folder / "results.sqlite").read_bytes() == before
        assert sorted(p.name for p in folder.iterdir()) == ["results.sqlite"]
    finally:
        os.chmod(root / "exp", 0o755)
        shutil.rmtree(root, ignore_errors=True)


def test_a_running_run_whose_process_is_gone_is_shown_interrupted(tmp_path, capsys):
    import os
    import sys

    with ResultStore(tmp_path) as store:
        mine = store.start_run("toy", "sgd", {"width": 4}, 0).run_id
    # another process starts a run and dies without finishing it (as after SIGKILL or Ctrl-C)
    script = ("import sys; from lopkit.runner.store import ResultStore; "
              "ResultStore(sys.argv[1]).start_run('toy', 'sgd', {'width': 4}, 1); import os; os._exit(0)")
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=120,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    with ResultStore(tmp_path) as store:
        runs = store.runs().set_index("seed")
        # a run owned by another host cannot be checked from here: it stays 'running'
        store.conn.execute("UPDATE runs SET host = 'elsewhere', status = 'running' WHERE run_id = ?", (mine,))
        elsewhere = store.runs().set_index("run_id").loc[mine, "status"]
    assert runs.loc[0, "status"] == "running" and runs.loc[0, "pid"] == os.getpid()  # this process is alive
    assert runs.loc[1, "status"] == "interrupted" and runs.loc[1, "stored_status"] == "running"
    assert elsewhere == "running"
    code, out, _err = cli(["list", str(tmp_path)], capsys)
    assert code == 0 and "interrupted" in out and "rerun its command to resume" in out
    from lopkit.report.build import build_report

    page = build_report(tmp_path).html_path.read_text()
    assert "interrupted: 1" in page and "running: 1" in page and "INTERRUPTED run" in page


def test_a_store_written_before_the_pid_columns_is_read_and_upgraded(tmp_path):
    path = tmp_path / "results.sqlite"
    with contextlib.closing(sqlite3.connect(path)) as conn:  # the runs table as the first release wrote it
        conn.executescript(store_module._SCHEMA.replace(",\n    pid INTEGER,\n    host TEXT", ""))
        conn.execute("INSERT INTO runs (run_id, benchmark, method, seed, config_json, status, created_at, updated_at) "
                     "VALUES ('r1', 'toy', 'sgd', 0, '{}', 'running', 'now', 'now')")
        conn.commit()
        assert "pid" not in {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
    before = path.read_bytes()
    with ResultStore(tmp_path, read_only=True) as store:  # read as it is: no owner known, stays 'running'
        runs = store.runs()
    assert runs["status"].tolist() == ["running"] and runs["pid"].isna().all()
    assert path.read_bytes() == before
    with ResultStore(tmp_path) as store:  # opened for writing: the columns are added, the run is kept
        store.start_run("toy", "sgd", {"width": 4}, 1)
        assert sorted(store.runs()["status"]) == ["running", "running"]
