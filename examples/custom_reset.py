"""Your own reset rule with lopkit's building blocks: find the unit groups, pick units, reset them.

    python examples/custom_reset.py                 # with the rule
    python examples/custom_reset.py --no-reset      # plain training, for comparison

The rule here: at each task boundary, every hidden unit that is zero on the whole probe batch (a dead ReLU) gets
fresh incoming weights, zero outgoing weights and zeroed Adam moments (``lk.reset_units``). The stream is
scikit-learn's digits with labels shuffled anew every task; the script prints each task's final train accuracy
and how many units the rule found dead.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import lopkit as lk
from lopkit.data import load_digits_dataset
from lopkit.data.tasks import random_label_tasks
from lopkit.mitigations.layers import unit_activations
from lopkit.seeding import seeded_generator


def dead_units(model: nn.Module, group: lk.UnitGroup, probe: torch.Tensor) -> torch.Tensor:
    """The units of ``group`` whose activation is zero on every probe sample (a bool mask)."""
    return (unit_activations(model, group, probe) == 0).all(dim=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--steps-per-task", type=int, default=400)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--no-reset", action="store_true", help="train without the rule")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    x, _ = load_digits_dataset()
    x = x[:512]
    labels = random_label_tasks(len(x), 10, args.tasks, seed=args.seed)
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    groups = lk.find_unit_groups(model)  # Linear -> ReLU -> Linear chains: here '1' and '3'
    batches = seeded_generator(args.seed, 1)
    resets = seeded_generator(args.seed, 2)  # the fresh weights come from the run's seed too

    for task in range(args.tasks):
        y = labels[task]
        if task > 0 and not args.no_reset:
            for group in groups:
                lk.reset_units(group, dead_units(model, group, x), optimizer, generator=resets)
        for _ in range(args.steps_per_task):
            rows = torch.randint(len(x), (32,), generator=batches)
            loss = nn.functional.cross_entropy(model(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            accuracy = (model(x).argmax(1) == y).float().mean().item()
        dead = sum(int(dead_units(model, group, x).sum()) for group in groups)
        print(f"task {task}: train accuracy {accuracy:.3f}, dead units {dead} of "
              f"{sum(g.num_units for g in groups)}", flush=True)


if __name__ == "__main__":
    main()
