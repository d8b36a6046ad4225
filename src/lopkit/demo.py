"""``lopkit demo``: a one-minute look at loss of plasticity with the Monitor in a plain PyTorch loop.

Two MLPs (no normalisation vs LayerNorm) learn a sequence of 2-class Fashion-MNIST tasks with Adam. After
every task the Monitor measures each layer on a probe batch. The demo prints the diagnostics table of the
last task and writes a PNG with accuracy, dead fraction, effective rank and duplicate fraction per task.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

DEMO_METRICS = ["dead_fraction", "frozen_fraction", "dormant_fraction", "duplicate_fraction", "effective_rank",
                "stable_rank", "weight_norm", "gradient_norm"]


def load_demo_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Fashion-MNIST (Debian package) if installed, else sklearn's bundled digits; returns train/test and a name."""
    from lopkit.data.digits import load_digits_dataset
    from lopkit.data.fashion_mnist import DatasetNotFoundError, load_fashion_mnist

    try:
        x_train, y_train = load_fashion_mnist("train")
        x_test, y_test = load_fashion_mnist("test")
        return x_train, y_train, x_test, y_test, "Fashion-MNIST"
    except DatasetNotFoundError as err:
        print(f"[demo] {err}\n[demo] falling back to sklearn's digits")
        x, y = load_digits_dataset()
        split = int(0.8 * len(x))
        return x[:split], y[:split], x[split:], y[split:], "sklearn digits"


def make_mlp(in_features: int, width: int, depth: int, norm: bool) -> nn.Sequential:
    """A ReLU MLP with an optional LayerNorm before each activation."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(in_features if i == 0 else width, width))
        if norm:
            layers.append(nn.LayerNorm(width))
        layers.append(nn.ReLU())
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def train_sequence(norm: bool, data, tasks: list[list[int]], steps_per_task: int, seed: int, width: int, depth: int,
                   lr: float):
    """Train one model over the task sequence; return per-task test accuracy and the Monitor's tidy rows."""
    from lopkit.diagnostics.monitor import Monitor

    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = make_mlp(x_train.shape[1], width, depth, norm)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    monitor = Monitor(model, layers=[nn.ReLU], metrics=DEMO_METRICS)
    head = model[-1]
    accuracies = []
    for task, classes in enumerate(tasks):
        classes_t = torch.tensor(classes)
        train_idx = torch.nonzero(torch.isin(y_train, classes_t)).squeeze(1)
        test_idx = torch.nonzero(torch.isin(y_test, classes_t)).squeeze(1)
        mask = torch.full((10,), float("-inf"))
        mask[classes_t] = 0.0
        with torch.no_grad():  # shared head zeroed at each task start (as in the paper's continual runs)
            head.weight.zero_()
            head.bias.zero_()
        model.train()
        for _ in range(steps_per_task):
            batch = train_idx[torch.randint(len(train_idx), (64,), generator=generator)]
            loss = nn.functional.cross_entropy(model(x_train[batch]) + mask, y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            predictions = (model(x_test[test_idx]) + mask).argmax(1)
        accuracies.append(float((predictions == y_test[test_idx]).float().mean()))
        probe = train_idx[torch.randperm(len(train_idx), generator=generator)[:512]]
        monitor.measure(x_train[probe], y_train[probe],
                        loss_fn=lambda out, y: nn.functional.cross_entropy(out + mask, y), step=task)
    return accuracies, monitor


def plot_demo(results: dict, path: Path, dataset: str) -> None:
    """Four panels over tasks, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6), dpi=100)
    for name, (accuracies, monitor) in results.items():
        frame = monitor.to_dataframe()
        axes[0].plot(range(len(accuracies)), accuracies, marker="o", label=name)
        for ax, metric in zip(axes[1:], ["dead_fraction", "effective_rank", "duplicate_fraction"]):
            series = frame[frame.metric == metric].groupby("step")["value"].mean()
            ax.plot(series.index, series.values, marker="o", label=name)
    titles = ["test accuracy on each new task", "dead fraction (mean over ReLU layers)",
              "effective rank (mean over ReLU layers)", "duplicate fraction (mean over ReLU layers)"]
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("task")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"lopkit demo: continual 2-class {dataset} tasks, Adam", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def run_demo(args: argparse.Namespace) -> int:
    """Run both models, print the table and per-task accuracy, write the PNG."""
    from lopkit.configs import ConfigError
    from lopkit.runner.cli_common import apply_threads, error_exit

    try:
        if apply_threads(args) is None:
            torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    except ConfigError as err:
        return error_exit(str(err))
    start = time.perf_counter()
    x_train, y_train, x_test, y_test, dataset = load_demo_data()
    generator = torch.Generator().manual_seed(args.seed)
    tasks = []
    while len(tasks) < args.tasks:  # disjoint class pairs, reshuffled each cycle of 5
        order = torch.randperm(10, generator=generator).tolist()
        tasks += [order[i:i + 2] for i in range(0, 10, 2)]
    tasks = tasks[: args.tasks]
    data = (x_train, y_train, x_test, y_test)
    results = {}
    for name, norm in (("plain MLP", False), ("MLP + LayerNorm", True)):
        print(f"[demo] training {name} on {args.tasks} tasks of {args.steps} steps ({dataset}) ...", flush=True)
        results[name] = train_sequence(norm, data, tasks, args.steps, args.seed, args.width, args.depth, args.lr)
    for name, (accuracies, monitor) in results.items():
        print(f"\n== {name}: test accuracy per task: " + " ".join(f"{a:.3f}" for a in accuracies))
        print(monitor.format_table())
    out = Path(args.out)
    plot_path = out / "demo.png"
    plot_demo(results, plot_path, dataset)
    frames = []
    for name, (_, monitor) in results.items():
        frames.append(monitor.to_dataframe().assign(model=name))
    out.mkdir(parents=True, exist_ok=True)
    import pandas as pd

    pd.concat(frames).to_csv(out / "demo_metrics.csv", index=False)
    print(f"\n[demo] wrote {plot_path} and {out / 'demo_metrics.csv'} in {time.perf_counter() - start:.0f} s")
    return 0


def register(subparsers) -> None:
    """Add the ``demo`` sub-command."""
    from lopkit.runner.cli_common import add_threads_flag

    parser = subparsers.add_parser(
        "demo", help="one-minute demo: plain vs LayerNorm MLP on changing tasks, diagnostics table + PNG",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10, help="number of 2-class tasks (default 10)")
    parser.add_argument("--steps", type=int, default=300, help="Adam steps per task (default 300)")
    parser.add_argument("--width", type=int, default=256, help="hidden width (default 256)")
    parser.add_argument("--depth", type=int, default=3, help="hidden layers (default 3)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/demo", help="folder for demo.png and demo_metrics.csv")
    add_threads_flag(parser)
    parser.set_defaults(func=run_demo)
