"""Print the plasticity probe's gain on healthy and trapped networks next to a fresh copy's: the figures behind
``DiagnoseConfig.plasticity_ratio``, ``probe_steps`` and ``probe_lr`` (docs/diagnose.md).

Each row is one network state, measured the way ``lopkit diagnose`` measures a model + probe: ``probe_gain`` of the
network and of its fresh copy (``diagnose.fresh_copy``, the reference), on the same probe, with the default (or
``--set``) DiagnoseConfig; the ratio is what the *low plasticity-probe gain* rule compares with ``plasticity_ratio``.
States: fresh ReLU MLPs with and without LayerNorm (10-32-32-4, 256 N(0, 1) probe samples, the shapes of
tests/test_diagnose.py), the same MLP with every first-layer unit switched off (bias -1000), an exact x2 clone of a
width-16 MLP (its reference is a fresh width-32 MLP), and, with ``--e1``, the E1 analogue (``random_labels`` preset
``e1``, ``num_tasks=4``) trained with SGD and with LayerNorm, on its own probe.

Usage: ``PYTHONPATH=src python scripts/diagnose_probe_levels.py [--seeds 0 1 2] [--e1] [--set key=value ...]``
"""

from __future__ import annotations

import argparse
import sys


def _mlp(width: int, seed: int, norm: bool = False, inputs: int = 10, outputs: int = 4):
    """A 2-hidden-layer ReLU MLP (optionally with LayerNorm) initialised from ``seed`` through lopkit.seeding."""
    import torch
    from torch import nn

    from lopkit.seeding import derive_seed, rng_sandbox, stable_key

    with rng_sandbox():
        torch.manual_seed(derive_seed(seed, stable_key("diagnose_probe_levels")))
        layers: list[nn.Module] = []
        d = inputs
        for _ in range(2):
            layers += [nn.Linear(d, width)] + ([nn.LayerNorm(width)] if norm else []) + [nn.ReLU()]
            d = width
        layers.append(nn.Linear(d, outputs))
        return nn.Sequential(*layers)


def _states(seed: int, e1: bool):
    """(name, model, probe inputs) of every network state measured for ``seed``."""
    import torch

    from lopkit.seeding import seeded_generator, stable_key
    from lopkit.theory.cloning import clone

    x = torch.randn(256, 10, generator=seeded_generator(seed, stable_key("diagnose_probe_levels_x")))
    yield "fresh MLP", _mlp(32, seed), x
    yield "fresh LayerNorm MLP", _mlp(32, seed, norm=True), x
    silenced = _mlp(32, seed)
    with torch.no_grad():
        silenced[0].bias.fill_(-1e3)
    yield "first layer dead (bias -1000)", silenced, x
    yield "x2 clone of a width-16 MLP", clone(_mlp(16, seed), 2)[0], x
    if e1:
        for method in ("sgd", "layernorm"):
            model, probe = _e1(seed, method)
            yield f"E1 analogue, 4 tasks, {method}", model, probe


def _e1(seed: int, method: str):
    """The E1 analogue (random_labels/e1, 4 tasks) trained to its end with ``method``; (model, its probe inputs)."""
    from lopkit.benchmarks.registry import get_benchmark
    from lopkit.runner.diagnose_cli import _benchmark_probe
    from lopkit.runner.execute import resolve_methods

    cls = get_benchmark("random_labels")
    bench = cls(cls.make_config("e1", {"num_tasks": 4}), seed, resolve_methods(method))
    while not bench.done:
        bench.run(1000)
    return bench.model, _benchmark_probe(bench)


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--e1", action="store_true", help="also train and measure the 4-task E1 analogue (minutes)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="DiagnoseConfig fields")
    parser.add_argument("--target", choices=("random", "head"), default="random",
                        help="the probe diagnose uses (random target), or the same after a fresh head (comparison)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    from lopkit.configs import ConfigError, build_config, parse_overrides
    from lopkit.diagnostics.diagnose import DiagnoseConfig, fresh_copy
    from lopkit.diagnostics.plasticity import plasticity_probe

    torch.set_num_threads(args.threads)
    try:
        config = build_config(DiagnoseConfig, parse_overrides(args.set))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    def probe(model, x) -> dict[str, float]:
        """diagnose's probe (``probe_gain`` is this call's gain with ``target="random"``)."""
        return plasticity_probe(model, x, config.probe_steps, config.seed, target=args.target, lr=config.probe_lr)

    print(f"probe: {config.probe_steps} Adam steps at lr {config.probe_lr:g}, {args.target} target, seed {config.seed}; "
          f"plasticity_ratio {config.plasticity_ratio:g}")
    print("| state | seed | probe samples | loss before | gain | fresh copy's loss before | fresh copy's gain | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for seed in args.seeds:
        for name, model, x in _states(seed, args.e1):
            value, reference = probe(model, x), probe(fresh_copy(model, config.seed), x)
            print(f"| {name} | {seed} | {x.shape[0]} | {value['loss_before']:.4g} | {value['gain']:.4f} | "
                  f"{reference['loss_before']:.4g} | {reference['gain']:.4f} | {value['gain'] / reference['gain']:.3f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
