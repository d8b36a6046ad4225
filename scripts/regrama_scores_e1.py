"""Print what ReGraMa sees at each check on the E1 analogue (random_labels, preset e1): GraMa score quantiles, how
many units are at or below tau, how many had zero activation over the window, and how many it reset.

    PYTHONPATH=src python scripts/regrama_scores_e1.py                      # regrama as configured by default
    PYTHONPATH=src python scripts/regrama_scores_e1.py \\
        regrama:gradient=post_activation:tau=0.025:window_steps=100        # lopkit's definition before issue 17's fix

Arguments: method spec (default ``regrama``), seed (default 0). One thread.
"""

from __future__ import annotations

import sys
import time
import types

import torch

from lopkit.benchmarks.base import get_benchmark
from lopkit.diagnostics.activations import dormant_scores
from lopkit.mitigations.field import ReGraMa
from lopkit.runner.execute import resolve_methods

QUANTILES = (0.0, 0.01, 0.1, 0.5)


def describe(scores: torch.Tensor) -> str:
    """Quantiles and maximum of a score vector."""
    q = torch.quantile(scores.double(), torch.tensor(QUANTILES, dtype=torch.float64))
    return " ".join(f"{v:.3g}" for v in q.tolist()) + f" max {float(scores.max()):.3g}"


def record_checks(method: ReGraMa, step_of: callable) -> None:
    """Wrap the method's per-group check to print its scores before it acts."""
    original = method._check

    def check(self, index, group, optimizer):
        state = self.stats[index]
        scores = self.scores(index)
        silent = int((dormant_scores((state["sum_abs"] / max(state["count"], 1)).unsqueeze(0)) == 0).sum())
        before = self.total_replaced
        original(index, group, optimizer)
        print(f"step {step_of():5d} {group.name}: scores q{list(QUANTILES)} = {describe(scores)}; "
              f"<= tau {int((scores <= self.config.tau).sum())}; zero activation {silent}; "
              f"reset {self.total_replaced - before} of {group.num_units}", flush=True)

    method._check = types.MethodType(check, method)


def main() -> None:
    """Run one seed and print the checks, the per-task online accuracy and the resets."""
    torch.set_num_threads(1)
    spec = sys.argv[1] if len(sys.argv) > 1 else "regrama"
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    cls = get_benchmark("random_labels")
    methods = resolve_methods(spec)
    bench = cls(cls.make_config("e1", {}), seed, methods)
    regrama = [m for m in methods if isinstance(m, ReGraMa)]
    for method in regrama:
        print(f"{spec}: gradient={method.config.gradient} tau={method.config.tau} every={method.config.every} "
              f"window_steps={method.config.window_steps}")
        record_checks(method, lambda: bench.step)
    start = time.time()
    rows = bench.run(bench.total_steps)
    accuracy = [round(r["value"], 3) for r in rows if r["metric"] == "task_online_accuracy"]
    print("task_online_accuracy per task:", accuracy)
    for method in regrama:
        print("resets per group:", method.replaced_per_group, "total:", method.total_replaced)
    print(f"seed {seed}, 1 thread, {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
