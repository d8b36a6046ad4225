"""Print the plasticity probe's figures on healthy and trapped networks next to a fresh copy's: the figures behind
``DiagnoseConfig.plasticity_ratio``, ``probe_steps`` and ``probe_lr`` (docs/diagnose.md).

Each row is one network state, measured the way ``lopkit diagnose`` measures a model + probe: the probe of the
network and of its fresh copy (``diagnose.fresh_copy``, the reference), on the same probe batch, with the default (or
``--set``) DiagnoseConfig. Columns: the judged quantity, ``probe_fit`` (``diagnose.probe_fit``: the fraction of a fresh
N(0, 1) offset of its own output the copy learns, ``plasticity_probe(target="residual")["fit"]``) and the *fit ratio*
network / fresh copy that the *low plasticity-probe fit* rule compares with ``plasticity_ratio``; beside it the former
judged quantity, the gain ratio ``gain / gain(fresh copy)`` with ``gain = 1 - L_after / L_before`` fitting an N(0, 1)
target (``target="random"``, ``diagnose.probe_gain``), and that probe's L_before. With ``--candidates`` also the other
candidates measured before choosing, all with the random target: the ratio of the R^2 reached (``fit``), of the final
losses (fresh copy's / network's), of R^2 with a fresh head (``target="head"``), and of the areas under the fitting
curves (``loss_auc``, fresh copy's / network's).

States: fresh ReLU MLPs with and without LayerNorm (10-32-32-4, 256 N(0, 1) probe samples, the shapes of
tests/test_diagnose.py), the same MLP with every first-layer unit switched off (bias -1000), an exact x2 clone of a
width-16 MLP (its reference is a fresh width-32 MLP); with ``--e1 TASKS ...`` the E1 analogue (``random_labels``
preset ``e1`` with ``num_tasks`` = the largest of TASKS, measured after each of TASKS) trained with SGD and with
LayerNorm, on its own probe; with ``--bitflip`` the bit-flipping learner (``bitflip`` preset ``default`` with width
10, flip_period 1000, 100k steps: the settings of the stored runs/e17/compare_bitflip runs) trained with ``sgd`` and
with ``cbp``, on its run probe. ``--cache DIR`` keeps the trained networks (``torch.save``) to measure them again.

Usage: ``PYTHONPATH=src python scripts/diagnose_probe_levels.py [--seeds 0 1 2] [--e1 4 8] [--bitflip]
[--candidates] [--cache DIR] [--set key=value ...]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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


def _states(seed: int, e1: list[int], bitflip: bool, cache: Path | None):
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
            for tasks, model, probe in _e1(seed, method, e1, cache):
                yield f"E1 analogue, {tasks} tasks, {method}", model, probe
    if bitflip:
        for method in ("sgd", "cbp"):
            model, probe = _bitflip(seed, method, cache)
            yield f"bit-flipping, 100k steps, {method}", model, probe


def _cached(cache: Path | None, name: str, build):
    """``build()`` -> (model, probe), kept in ``cache/name.pt`` when a cache folder is given."""
    import copy

    import torch

    from lopkit.diagnostics.plasticity import _strip_hooks

    if cache is None:
        return build()
    path = cache / f"{name}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=False)
        return saved["model"], saved["probe"]
    model, probe = build()
    cache.mkdir(parents=True, exist_ok=True)
    saved = copy.deepcopy(model)
    _strip_hooks(saved)  # the benchmark's Monitor hooks cannot be pickled
    torch.save({"model": saved, "probe": probe}, path)
    return model, probe


def _e1(seed: int, method: str, tasks: list[int], cache: Path | None):
    """The E1 analogue (random_labels/e1) trained with ``method``: (tasks, model, its probe) after each of ``tasks``."""
    import copy

    from lopkit.benchmarks.registry import get_benchmark
    from lopkit.runner.diagnose_cli import _benchmark_probe
    from lopkit.runner.execute import resolve_methods

    cls = get_benchmark("random_labels")
    config = cls.make_config("e1", {"num_tasks": max(tasks)})
    bench = None
    for count in sorted(tasks):
        def build(count: int = count):
            nonlocal bench
            if bench is None:
                bench = cls(config, seed, resolve_methods(method))
            while not bench.done and bench.step < count * config.steps_per_task:
                bench.run(count * config.steps_per_task - bench.step)
            return copy.deepcopy(bench.model), _benchmark_probe(bench)

        model, probe = _cached(cache, f"e1_{method}_s{seed}_t{count}", build)
        yield count, model, probe


def _bitflip(seed: int, method: str, cache: Path | None):
    """The bit-flipping learner of the stored e17 comparison trained to its end with ``method``: (model, probe)."""
    from lopkit.benchmarks.registry import get_benchmark
    from lopkit.runner.diagnose_cli import _benchmark_probe
    from lopkit.runner.execute import resolve_methods

    def build():
        cls = get_benchmark("bitflip")
        bench = cls(cls.make_config("default", {"width": 10, "flip_period": 1000, "num_steps": 100_000}), seed,
                    resolve_methods(method))
        while not bench.done:
            bench.run(10_000)
        return bench.model, _benchmark_probe(bench)

    return _cached(cache, f"bitflip_{method}_s{seed}", build)


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--e1", type=int, nargs="*", default=None, metavar="TASKS",
                        help="also train and measure the E1 analogue after these task counts (default 4; minutes)")
    parser.add_argument("--bitflip", action="store_true", help="also train and measure bit-flipping sgd and cbp")
    parser.add_argument("--candidates", action="store_true", help="also print the candidate quantities not judged")
    parser.add_argument("--cache", type=Path, default=None, help="folder keeping the trained networks")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="DiagnoseConfig fields")
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
    e1 = ([4] if args.e1 == [] else args.e1) or []

    def probe(model, x, target: str = "residual") -> dict[str, float]:
        """diagnose's probe (``probe_fit`` is this call; ``probe_gain`` its gain with ``target="random"``)."""
        return plasticity_probe(model, x, config.probe_steps, config.seed, target=target, lr=config.probe_lr)

    print(f"probe: {config.probe_steps} Adam steps at lr {config.probe_lr:g}, seed {config.seed}; "
          f"plasticity_ratio {config.plasticity_ratio:g}, probe_min_fit {config.probe_min_fit:g}")
    head = ("| state | seed | probe samples | probe_fit | fresh copy's | **fit ratio** (judged) | L_before, random "
            "| fresh copy's | gain ratio, random (former) |")
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    if args.candidates:
        head += " R^2 ratio, random | L_after ratio, random | R^2 ratio, fresh head | AUC ratio, random |"
        rule += "---:|---:|---:|---:|"
    print(head)
    print(rule)
    for seed in args.seeds:
        for name, model, x in _states(seed, e1, args.bitflip, args.cache):
            twin = fresh_copy(model, config.seed)
            value, reference = probe(model, x), probe(twin, x)
            old, old_ref = probe(model, x, "random"), probe(twin, x, "random")
            line = (f"| {name} | {seed} | {x.shape[0]} | {value['fit']:.4f} | {reference['fit']:.4f} | "
                    f"**{value['fit'] / reference['fit']:.3f}** | {old['loss_before']:.4g} | {old_ref['loss_before']:.4g} | "
                    f"{old['gain'] / old_ref['gain']:.3f} |")
            if args.candidates:
                h, h_ref = probe(model, x, "head"), probe(twin, x, "head")
                line += (f" {old['fit'] / old_ref['fit']:.3f} | {old_ref['loss_after'] / old['loss_after']:.3f} | "
                         f"{h['fit'] / h_ref['fit']:.3f} | {old_ref['loss_auc'] / old['loss_auc']:.3f} |")
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
