"""Print the T1/T2 cloning figures for the small ResNet and ViT (lop_paper.md checklist T1, T2).

For each architecture: build the base model, clone it x2 (function-preserving, ``lopkit.theory.clone``),
train the clone from a fresh optimiser on a Fashion-MNIST subset (or synthetic images) and print the
worst and mean forward/backward cloning R^2 (variance version, over all partitioned modules, on a fixed
probe batch in eval mode) after ``--steps`` steps, with the probe loss before and after.  Settings:
SGD, SGD + momentum 0.9, Adam (T1: R^2 must stay 1), noisy SGD (sigma0 = 0.01, decay ``--noise-decay``),
a single noisy first step (decay 0) and dropout 0.1 (T2: R^2 falls below 1).  Float64 throughout.

    PYTHONPATH=src python scripts/arch_clone_check.py --steps 300 --seed 0 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from lopkit.benchmarks.architectures import build_resnet, build_vit
from lopkit.data.seeding import derive_seed, seeded_generator
from lopkit.theory.cloning import clone
from lopkit.theory.invariance import track_clone_training

SETTINGS = {
    "sgd": dict(optimizer="sgd"),
    "momentum": dict(optimizer="momentum"),
    "adam": dict(optimizer="adam"),
    "noisy_sgd": dict(optimizer="sgd", noise_sigma=0.01),
    "one_noisy_step": dict(optimizer="sgd", noise_sigma=0.01, noise_decay=0.0),
    "dropout_0.1": dict(optimizer="sgd", dropout=0.1),
}
LEARNING_RATES = {"resnet": {"sgd": 0.05, "momentum": 0.01, "adam": 1e-3},
                  "vit": {"sgd": 0.05, "momentum": 0.01, "adam": 1e-3}}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per run (default 300)")
    parser.add_argument("--samples", type=int, default=1024, help="training samples (default 1024)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--noise-decay", type=float, default=0.99, help="lambda of noisy SGD (default 0.99)")
    parser.add_argument("--data", choices=("fashion", "synthetic"), default="fashion")
    parser.add_argument("--archs", default="resnet,vit", help="comma-separated subset of resnet,vit")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.samples < args.batch_size or args.threads < 1 or args.seed < 0:
        parser.error("need --steps >= 1, --samples >= --batch-size, --threads >= 1 and --seed >= 0")
    args.archs = [a for a in args.archs.split(",") if a]
    if not args.archs or set(args.archs) - {"resnet", "vit"}:
        parser.error(f"--archs must name resnet and/or vit, got {','.join(args.archs)!r}")
    return args


def load_data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random subset of Fashion-MNIST (standardised) or Gaussian images with random labels."""
    generator = seeded_generator(args.seed, 0)
    if args.data == "synthetic":
        x = torch.randn(args.samples, 1, 28, 28, generator=generator, dtype=torch.float64)
        return x, torch.randint(0, 10, (args.samples,), generator=generator)
    from lopkit.data.errors import DatasetNotFoundError
    from lopkit.data.fashion_mnist import load_fashion_mnist

    try:
        x, y = load_fashion_mnist("train", flatten=False, dtype=torch.float64, standardize=True)
    except DatasetNotFoundError as error:
        raise SystemExit(f"error: Fashion-MNIST not found ({error}); install it or pass --data synthetic")
    index = torch.randperm(len(x), generator=generator)[: args.samples]
    return x[index], y[index]


def build(arch: str, seed: int) -> torch.nn.Module:
    """The base model, initialised from the run's seed (ResNet 8/16 channels; ViT dim 16, 4 heads, 2 blocks)."""
    torch.manual_seed(derive_seed(seed, 1))
    if arch == "resnet":
        return build_resnet(1, (8, 16), 1, 10, norm="batch").double()
    return build_vit(1, 28, 7, dim=16, depth=2, heads=4, mlp_ratio=2, out_features=10, norm="layer").double()


def summarise(rows: list[dict], step: int) -> dict[str, float]:
    """Worst and mean forward/backward R^2 at ``step`` and the probe loss at 0 and ``step``."""
    out: dict[str, float] = {}
    for direction in ("forward", "backward"):
        values = [r["value"] for r in rows if r["step"] == step and r["metric"] == f"cloning_r2_{direction}"]
        out[f"worst_{direction}"], out[f"mean_{direction}"] = min(values), sum(values) / len(values)
    losses = {r["step"]: r["value"] for r in rows if r["metric"] == "loss"}
    out["loss_0"], out["loss_end"] = losses[0], losses[step]
    return out


def main(argv: list[str] | None = None) -> None:
    """Run every (architecture, setting) pair and print one row each."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    x, y = load_data(args)
    print(f"# data={args.data} samples={args.samples} steps={args.steps} batch={args.batch_size} seed={args.seed} "
          f"threads={args.threads} noise_decay={args.noise_decay} float64 x2 interleaved clone")
    print(f"{'arch':7s} {'setting':15s} {'lr':>7s} {'1-worstF':>9s} {'1-worstB':>9s} {'meanF':>7s} {'meanB':>7s} "
          f"{'loss0':>6s} {'loss':>6s} {'sec':>5s}")
    for arch in args.archs:
        base = build(arch, args.seed)
        for name, setting in SETTINGS.items():
            setting = dict(setting)
            if name == "noisy_sgd":
                setting["noise_decay"] = args.noise_decay
            lr = LEARNING_RATES[arch][setting["optimizer"]]
            model, partition = clone(base, 2, "interleaved")
            start = time.perf_counter()
            rows = track_clone_training(model, partition, x, y, lr=lr, steps=args.steps, batch_size=args.batch_size,
                                        seed=derive_seed(args.seed, 2), record_every=args.steps,
                                        probe_inputs=x[:256], probe_targets=y[:256], **setting)
            s = summarise(rows, args.steps)
            print(f"{arch:7s} {name:15s} {lr:7.0e} {1 - s['worst_forward']:9.2e} {1 - s['worst_backward']:9.2e} "
                  f"{s['mean_forward']:7.4f} {s['mean_backward']:7.4f} {s['loss_0']:6.3f} {s['loss_end']:6.3f} "
                  f"{time.perf_counter() - start:5.0f}", flush=True)


if __name__ == "__main__":
    main()
