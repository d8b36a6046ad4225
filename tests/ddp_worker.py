"""One rank of a CPU DistributedDataParallel run (gloo) for tests/test_distributed.py.

``python ddp_worker.py RANK WORLD INIT_FILE OUT_FILE SPEC [SPEC ...]``: for each method spec, train the same MLP
with the method on this rank's slice of a fixed global batch stream, then save (rank 0 only) the final parameters,
the number of units the method replaced and the largest parameter difference between the ranks. Rank 0 alone also
measures a Monitor probe (with a loss) on the DDP model before the ranks compare their weights.
"""

from __future__ import annotations

import datetime
import sys

import torch
import torch.distributed as dist
from torch import nn

import lopkit as lk

STEPS, BATCH, SEED = 60, 16, 0  # BATCH rows per rank


GLOO_ABORT = "terminate called without an active exception"


def run_ranks(make_argvs, logs: list, env: dict, cwd=None, timeout: float = 300) -> list[int]:
    """Start one process per argv of ``make_argvs(attempt)`` (output to its log file), wait for all; their codes.

    Launched again, once, when a process failed and a log holds gloo's ``std::terminate`` line: 2-3 launches in
    about 45 on the loaded 2-core test machine died that way, and the cause is not found. Any other failure is
    returned at once. The retry gets a fresh rendezvous from ``make_argvs(2)``, and its results are checked as
    strictly as the first launch's.
    """
    import subprocess
    import warnings

    def launch(attempt: int) -> list[int]:
        processes = []
        for argv, log in zip(make_argvs(attempt), logs):
            with open(log, "w") as handle:  # a file, not a pipe: a full pipe would stall one rank and so all
                processes.append(subprocess.Popen(argv, env=env, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT))
        try:
            return [process.wait(timeout=timeout) for process in processes]
        finally:
            for process in processes:
                process.kill()

    codes = launch(1)
    if any(code != 0 for code in codes) and any(GLOO_ABORT in open(log).read() for log in logs):
        warnings.warn(f"a rank aborted in gloo ({GLOO_ABORT!r}); launching the ranks again once")
        codes = launch(2)
    return codes


def mlp() -> nn.Sequential:
    """The test model (seeded, so every rank and the one-process reference start equal)."""
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3))


def global_batches(world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The global batches (rank r's rows are r*BATCH:(r+1)*BATCH); shifted inputs make some units die."""
    generator = torch.Generator().manual_seed(123)
    return [(torch.randn(world * BATCH, 6, generator=generator) - 1.5 * (step // 20),
             torch.randint(0, 3, (world * BATCH,), generator=generator)) for step in range(STEPS)]


def train(model: nn.Module, method, batches, rows: slice) -> nn.Module:
    """Adam training with ``method`` hooked in; ``model`` may be a DDP wrapper."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    method.seed_from_run(SEED)
    method.attach(model, optimizer)
    for step, (x, y) in enumerate(batches):
        loss = nn.functional.cross_entropy(model(x[rows]), y[rows])
        optimizer.zero_grad()
        loss.backward()
        method.before_step(model, optimizer, step)
        optimizer.step()
        method.after_step(model, optimizer, step)
    return model


def replaced(method) -> int:
    """Units the (composed) method replaced."""
    parts = getattr(method, "methods", [method])
    return sum(int(getattr(part, "total_replaced", 0)) for part in parts)


def main(rank: int, world: int, init_file: str, out_file: str, specs: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    batches = global_batches(world)
    for spec in specs:
        method = lk.build_methods(spec)
        inner = mlp()
        ddp = nn.parallel.DistributedDataParallel(inner)
        train(ddp, method, batches, slice(rank * BATCH, (rank + 1) * BATCH))
        if rank == 0:  # a probe measured on one rank only must not enter DDP (its backward would wait for the others)
            x, y = batches[0]
            rows = lk.Monitor(ddp).measure(x, y, nn.functional.cross_entropy, step=STEPS)
            assert not any(row["layer"].startswith("module.") for row in rows)
        flat = torch.cat([p.detach().flatten() for p in inner.parameters()])
        everyone = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(everyone, flat)
        results[spec] = {"params": [p.detach().clone() for p in inner.parameters()], "replaced": replaced(method),
                         "rank_gap": max(float((other - flat).abs().max()) for other in everyone)}
    if rank == 0:
        torch.save(results, out_file)
    leave_together()


def leave_together() -> None:
    """A barrier, then shut the group down, so that no rank exits while another still works (here rank 0 saving).

    A guard only: a rank exiting early did not reproduce the gloo abort that :func:`run_ranks` retries.
    """
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:])
