"""Cost of the plasticity metrics (issue 17): ms per measurement, and in SGD steps of the same network.

Setting of the Monitor-overhead table (``benchmarks/monitor_overhead.py``): a 784-1000-1000-10 ReLU MLP, a
512-sample probe, SGD steps on batches of 256. For each Monitor metric, a Monitor measuring only that metric
(plus the probe forward, and the probe backward for ``grama_dormant_fraction``) is timed; the plain
``dead_fraction`` Monitor is the reference for the cost of the probe pass itself. The plasticity probe and the
pure functions are timed as explicit calls. Figures are process CPU time (steadier than the wall clock on a
shared machine), medians over ``--repeats``.

Usage: python benchmarks/metric_costs.py [--probe 512] [--batch 256] [--repeats 5] [--probe-steps 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch import nn

from lopkit.diagnostics.monitor import Monitor
from lopkit.diagnostics.plasticity import (
    PLASTICITY_METRICS,
    churn_metric,
    distance_from_init,
    distance_from_init_metric,
    one_step_plasticity,
    parameter_snapshot,
    plasticity_probe,
)


def cpu_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median process CPU time of ``fn()`` in ms (one warm-up call first)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append((time.process_time() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    """Print a markdown table of ms/measurement and SGD-step equivalents."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--probe-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 1000), nn.ReLU(), nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, 10))
    x = torch.randn(args.batch, 784, generator=generator)
    y = torch.randint(0, 10, (args.batch,), generator=generator)
    probe_x = torch.randn(args.probe, 784, generator=generator)
    probe_y = torch.randint(0, 10, (args.probe,), generator=generator)
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: timing only, the weights stay put

    def sgd_step() -> None:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()

    step_ms = cpu_ms(sgd_step, args.repeats)
    extras = {spec.name: spec for spec in PLASTICITY_METRICS}
    extras["churn"] = churn_metric()
    extras["distance_from_init"] = distance_from_init_metric(model)
    rows = []

    def monitor_cost(name: str, with_loss: bool) -> float:
        extra = [extras[name]] if name in extras else []
        monitor = Monitor(model, metrics=[name], extra_metrics=extra, max_rows=0)
        if with_loss:
            return cpu_ms(lambda: monitor.measure(probe_x, probe_y, loss_fn), args.repeats)
        return cpu_ms(lambda: monitor.measure(probe_x), args.repeats)

    reference = monitor_cost("dead_fraction", False)
    rows.append(("dead_fraction (reference: probe forward + 1 cheap metric)", "Monitor", reference))
    for name, with_loss in (("feature_norm", False), ("active_fraction", False), ("churn", False),
                            ("distance_from_init", False), ("grama_dormant_fraction", True)):
        rows.append((name, "Monitor, opt-in", monitor_cost(name, with_loss)))
    init = parameter_snapshot(model)
    rows.append(("distance_from_init (function, all layers + total)", "call",
                 cpu_ms(lambda: distance_from_init(model, init), args.repeats)))
    rows.append((f"plasticity_probe (random target, {args.probe_steps} Adam steps)", "call",
                 cpu_ms(lambda: plasticity_probe(model, probe_x, steps=args.probe_steps), args.repeats)))
    rows.append((f"plasticity_probe (fresh head, {args.probe_steps} Adam steps)", "call",
                 cpu_ms(lambda: plasticity_probe(model, probe_x, steps=args.probe_steps, target="head"), args.repeats)))
    rows.append(("one_step_plasticity (UPGD, next batch)", "call",
                 cpu_ms(lambda: one_step_plasticity(model, x, y, loss_fn, 0.01), args.repeats)))
    print(f"784-1000-1000-10 MLP, probe {args.probe}, batch {args.batch}, threads {args.threads}, "
          f"CPU ms (median of {args.repeats}); one SGD step = {step_ms:.1f} ms\n")
    print("| metric | how | ms / measurement | SGD steps |")
    print("|---|---|---|---|")
    for name, how, ms in rows:
        print(f"| {name} | {how} | {ms:.1f} | {ms / step_ms:.2f} |")


if __name__ == "__main__":
    main()
