"""Continual training under DistributedDataParallel on the CPU, with a lopkit method and a Monitor on rank 0.

    torchrun --standalone --nproc-per-node 2 examples/ddp_cpu.py --method cbp:replacement_rate=1e-3

The stream is scikit-learn's digits with labels shuffled anew every task (memorisation, one task after another).
Each rank trains on its own half of every batch; DDP averages the gradients, and
the method combines its unit statistics over the ranks, so both replicas reset the same units. Rank 0 prints each
task's final accuracy and the dead-unit fraction; at the end every rank checks that the weights are identical.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import nn

import lopkit as lk
from lopkit.data import load_digits_dataset
from lopkit.data.tasks import random_label_tasks
from lopkit.seeding import seeded_generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="cbp:replacement_rate=1e-3", help="lopkit method spec ('none' for plain)")
    parser.add_argument("--tasks", type=int, default=6)
    parser.add_argument("--steps-per-task", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32, help="rows per rank")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)

    x, _ = load_digits_dataset()
    x = x[:512]
    labels = random_label_tasks(len(x), 10, args.tasks, seed=args.seed)

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    method = lk.build_methods(args.method)
    model = method.prepare_model(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                                               nn.Linear(128, 10)))
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-3)
    method.seed_from_run(args.seed)
    monitor = lk.Monitor(ddp, metrics=["dead_fraction"]) if rank == 0 else None
    generator = seeded_generator(args.seed, 1)  # the same global batches on every rank

    with method.hook(ddp, optimizer):
        for task in range(args.tasks):
            y = labels[task]
            method.on_task_start(ddp, optimizer, task)
            for _ in range(args.steps_per_task):
                rows = torch.randint(len(x), (world * args.batch,), generator=generator)
                mine = rows[rank * args.batch:(rank + 1) * args.batch]
                loss = nn.functional.cross_entropy(ddp(x[mine]), y[mine])
                extra = method.loss_term(ddp)
                loss = loss + extra if extra is not None else loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            if monitor is not None:  # rank 0 alone: the probe runs on the inner model, outside DDP
                with torch.no_grad():
                    accuracy = (model(x).argmax(1) == y).float().mean().item()
                rows_measured = monitor.measure(x[:256], step=task)
                dead = max(r["value"] for r in rows_measured if r["metric"] == "dead_fraction")
                print(f"task {task}: train accuracy {accuracy:.3f}, largest dead-unit fraction {dead:.3f}", flush=True)

    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(everyone, flat)
    gap = max(float((other - flat).abs().max()) for other in everyone)
    if rank == 0:
        print(f"{method.name}: largest weight difference between the {world} ranks: {gap}")
    dist.barrier()  # leave together: no rank exits while another still works
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
