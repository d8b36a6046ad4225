"""DDP, DataParallel and torch.compile wrappers: walkers see the user's module; resets keep DDP replicas identical."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lopkit as lk
from lopkit.layer_types import unwrap_model, wrapper_chain
from lopkit.mitigations.field import combine_snr_steps
from lopkit.mitigations.layers import find_unit_groups, resolve_unit_groups

sys.path.insert(0, str(Path(__file__).parent))
import ddp_worker  # noqa: E402  (the rank script, reused for the one-process reference)

SRC = Path(__file__).resolve().parents[1] / "src"


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def test_wrappers_are_looked_through_by_unit_groups_and_the_monitor():
    model = _mlp()
    wrapped = nn.DataParallel(nn.DataParallel(model))  # on a CPU-only machine DataParallel just calls the module
    assert wrapper_chain(wrapped)[-1] is model and unwrap_model(wrapped) is model and unwrap_model(model) is model
    assert [g.incoming for g in find_unit_groups(wrapped)] == [model[0], model[2]]
    assert [g.name for g in resolve_unit_groups(wrapped)] == ["1", "3"]
    monitor = lk.Monitor(wrapped)
    names = [name for name, _ in model.named_modules() if name]
    assert [layer.name for layer in monitor.layers] == names  # as for the bare model: no "module.module." prefix
    rows = monitor.measure(torch.randn(16, 4), torch.randint(0, 2, (16,)), nn.functional.cross_entropy, step=0)
    assert {row["layer"] for row in rows} == {*names, "model"}


def test_torch_compile_wrapper_is_looked_through_without_compiling():
    model = _mlp()
    compiled = torch.compile(model)  # compiles lazily, on the first call, which this test never makes
    assert type(compiled).__name__ == "OptimizedModule" and unwrap_model(compiled) is model
    assert [g.incoming for g in find_unit_groups(compiled)] == [model[0], model[2]]


def test_cbp_trains_a_torch_compiled_model_as_the_plain_one():
    """Forward hooks on the inner modules fire inside the compiled forward (backend "eager": no C++ compiler)."""

    def run(wrap) -> tuple[int, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        trained = wrap(model)
        method = lk.build_methods("cbp:replacement_rate=0.1:maturity=2")
        optimizer = torch.optim.Adam(trained.parameters(), lr=1e-2)
        generator = torch.Generator().manual_seed(1)
        with method.hook(trained, optimizer):
            for _ in range(15):
                loss = nn.functional.cross_entropy(trained(torch.randn(32, 6, generator=generator)),
                                                   torch.randint(0, 3, (32,), generator=generator))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return method.total_replaced, [p.detach() for p in model.parameters()]

    plain_replaced, plain = run(lambda m: m)
    compiled_replaced, compiled = run(lambda m: torch.compile(m, backend="eager"))
    assert plain_replaced > 0 and compiled_replaced == plain_replaced
    for a, b in zip(compiled, plain):
        torch.testing.assert_close(a, b)


def test_combine_snr_steps_reads_the_ranks_as_one_batch_in_rank_order():
    state = {"fires": torch.tensor([5.0, 5.0, 5.0]), "samples": torch.tensor([10.0, 10.0, 10.0]),
             "silent": torch.tensor([2.0, 2.0, 2.0])}
    # per rank: (fires, samples, trailing silent run); unit 0 fires on both ranks, unit 1 on rank 0 only, unit 2 never
    parts = torch.tensor([[[1.0, 2.0, 0.0], [4.0, 4.0, 4.0], [1.0, 0.0, 4.0]],
                          [[3.0, 0.0, 0.0], [4.0, 4.0, 4.0], [0.0, 4.0, 4.0]]])
    combined = combine_snr_steps(state, parts)
    assert combined["fires"].tolist() == [9.0, 7.0, 5.0] and combined["samples"].tolist() == [18.0] * 3
    assert combined["silent"].tolist() == [0.0, 4.0, 10.0]  # unit 1: rank 0's run of 0 then rank 1's 4 samples


def test_run_ranks_launches_again_only_after_a_gloo_abort(tmp_path):
    abort = "import os, sys; sys.stderr.write(%r + '\\n'); sys.stderr.flush(); os.abort()" % ddp_worker.GLOO_ABORT
    attempts = []

    def argvs(attempt: int) -> list[list[str]]:
        attempts.append(attempt)
        return [[sys.executable, "-c", abort if attempt == 1 else "print('fine')"]]

    with pytest.warns(UserWarning, match="launching the ranks again once"):
        assert ddp_worker.run_ranks(argvs, [tmp_path / "a.log"], dict(os.environ)) == [0]
    assert attempts == [1, 2]
    attempts.clear()
    failing = [[sys.executable, "-c", "raise SystemExit(3)"]]
    other = ddp_worker.run_ranks(lambda attempt: attempts.append(attempt) or failing, [tmp_path / "b.log"],
                                 dict(os.environ))
    assert other == [3] and attempts == [1]  # any other failure is reported at once


def _run_ranks(tmp_path: Path, specs: list[str], world: int = 2) -> dict:
    """Launch ``world`` gloo ranks of tests/ddp_worker.py on ``specs``; rank 0's results."""
    out = tmp_path / "ranks.pt"
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    script = Path(__file__).parent / "ddp_worker.py"
    logs = [tmp_path / f"rank{rank}.log" for rank in range(world)]

    def argvs(attempt: int) -> list[list[str]]:
        init = tmp_path / f"init{attempt}"
        return [[sys.executable, str(script), str(rank), str(world), str(init), str(out), *specs]
                for rank in range(world)]

    codes = ddp_worker.run_ranks(argvs, logs, env)
    for code, log in zip(codes, logs):
        assert code == 0, log.read_text()[-3000:]
    return torch.load(out)


# (spec, whether the rank-combined decision equals one process's on the global batch exactly)
DDP_CASES = [
    ("cbp:replacement_rate=0.05:utility_type=contribution", True),
    ("cbp:replacement_rate=0.05", False),  # adaptable_contribution: |h - mean| uses each rank's batch mean
    ("snr:maturity=32:threshold=0.05", True),
    ("redo:every=10:window_steps=5:tau=0.3", True),
    ("reset_frozen:every=10:window_steps=5", True),
    ("cbp_aggressive:replacement_rate=0.05:maturity=10", False),  # the same utility as cbp's default
]


def test_ddp_ranks_reset_the_same_units_as_one_process_on_the_global_batch(tmp_path):
    results = _run_ranks(tmp_path, [spec for spec, _ in DDP_CASES])
    batches = ddp_worker.global_batches(2)
    for spec, exact in DDP_CASES:
        got = results[spec]
        assert got["replaced"] > 0, f"{spec}: no unit was reset, so the test shows nothing"
        assert got["rank_gap"] == 0.0, f"{spec}: the DDP replicas drifted apart by {got['rank_gap']}"
        if exact:
            method = lk.build_methods(spec)
            reference = ddp_worker.train(ddp_worker.mlp(), method, batches, slice(None))
            assert ddp_worker.replaced(method) == got["replaced"], spec
            for mine, ref in zip(got["params"], reference.parameters()):
                torch.testing.assert_close(mine, ref.detach(), rtol=1e-4, atol=1e-5, msg=spec)
