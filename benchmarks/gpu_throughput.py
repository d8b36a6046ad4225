"""Training throughput on the CPU and on CUDA: continual MLP/CNN, bit-flipping over 64 vectorised seeds, MoE.

For each device (``cpu``, and ``cuda`` when torch sees a CUDA device; otherwise it says "no CUDA device") times:

- ``permuted`` continual Fashion-MNIST benchmark, MLP and CNN at the ``default`` preset, Monitor off
  (``device=`` config setting; task-end evaluations inside the window are included, as in a real run);
- bit-flipping, ``--seeds`` (64) learners trained as one vectorised learner
  (:func:`lopkit.benchmarks.vmap_seeds.run_bitflip_seeds`, ``torch.func`` engine; the ``lean`` NumPy engine is
  timed on the CPU too), Monitor off; reported as seed-steps/s (steps/s x seeds);
- the MoE transformer (:class:`lopkit.moe.model.MoETransformer`, ``default`` size) on random byte tokens,
  AdamW, batch ``--moe-batch`` x its context.

Every timing runs ``--steps`` (continual), ``--bitflip-steps`` or ``--moe-steps`` steps after a short warm-up, with ``torch.cuda.synchronize()`` around CUDA windows.
A section whose data is missing (Fashion-MNIST) prints why and is skipped. ``--record`` writes the figures into
``benchmarks/README.md``.

Usage: python benchmarks/gpu_throughput.py [--steps 50] [--bitflip-steps 2000] [--moe-steps 10] [--seeds 64] [--threads 1] [--devices cpu,cuda]
       [--sections continual,bitflip,moe] [--record]
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import torch

from _record import add_record_argument, record

SECTIONS = ("continual", "bitflip", "moe")


def _sync(device: torch.device) -> None:
    """Wait for queued CUDA work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, work: Callable[[], None]) -> float:
    """Seconds of ``work()`` on ``device`` (queued CUDA work included)."""
    _sync(device)
    start = time.perf_counter()
    work()
    _sync(device)
    return time.perf_counter() - start


def continual_rates(device: torch.device, steps: int) -> dict[str, float]:
    """steps/s of the permuted benchmark's MLP and CNN (Monitor off)."""
    from lopkit.benchmarks.registry import get_benchmark

    cls = get_benchmark("permuted")
    rates = {}
    for model in ("mlp", "cnn"):
        bench = cls(cls.make_config("default", {"model": model, "monitor": False, "device": str(device)}), seed=0)
        bench.run(5)
        rates[f"continual {model} (permuted)"] = steps / _timed(device, lambda: bench.run(steps))
    return rates


def bitflip_rates(device: torch.device, steps: int, seeds: int) -> dict[str, float]:
    """Seed-steps/s of ``seeds`` bit-flipping learners vectorised in one process (func engine; lean on the CPU)."""
    from lopkit.benchmarks.bitflip import BitFlipBenchmark
    from lopkit.benchmarks.vmap_seeds import run_bitflip_seeds

    config = BitFlipBenchmark.make_config("default", {"num_steps": steps + 10, "monitor_every": 0,
                                                      "device": str(device)})
    engines = ["func", "lean"] if device.type == "cpu" else ["func"]
    rates = {}
    for engine in engines:
        run_bitflip_seeds(config, list(range(seeds)), engine=engine, n_steps=10)  # warm-up
        seconds = _timed(device, lambda: run_bitflip_seeds(config, list(range(seeds)), engine=engine, n_steps=steps))
        rates[f"bitflip x{seeds} seeds ({engine}), seed-steps/s"] = steps * seeds / seconds
    return rates


def moe_rates(device: torch.device, steps: int, batch: int) -> dict[str, float]:
    """steps/s of the default-size MoE transformer (random byte tokens, AdamW, next-token loss + aux loss)."""
    from lopkit.moe.model import MoETransformer

    model = MoETransformer.from_preset("default", seed=0).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    context = model.config.context
    tokens = torch.randint(0, model.config.vocab_size, (batch, context + 1), generator=generator).to(device)

    def train(n: int) -> None:
        for _ in range(n):
            out = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]),
                                                     tokens[:, 1:].reshape(-1)) + out.aux_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    train(2)
    return {f"moe default (batch {batch}x{context})": steps / _timed(device, lambda: train(steps))}


def main() -> None:
    """Time every section on every available device and print a table (and record it with --record)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="timed steps of each continual benchmark")
    parser.add_argument("--bitflip-steps", type=int, default=2000, help="timed steps of the vectorised bit-flipping")
    parser.add_argument("--moe-steps", type=int, default=10, help="timed MoE steps")
    parser.add_argument("--seeds", type=int, default=64, help="vectorised bit-flipping seeds")
    parser.add_argument("--moe-batch", type=int, default=8, help="MoE sequences per step")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op CPU threads")
    parser.add_argument("--devices", default="cpu,cuda", help="comma-separated devices to time")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {SECTIONS}")
    add_record_argument(parser)
    args = parser.parse_args()
    sections = [s for s in args.sections.split(",") if s]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or min(args.steps, args.bitflip_steps, args.moe_steps, args.seeds, args.threads, args.moe_batch) < 1:
        parser.error(f"sections must come from {SECTIONS} (got {unknown}); step counts, seeds, threads and the MoE "
                     "batch must be >= 1")
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    devices = []
    for name in [d.strip() for d in args.devices.split(",") if d.strip()]:
        if name.startswith("cuda") and not torch.cuda.is_available():
            print(f"{name}: no CUDA device (torch {torch.__version__}, CUDA build: {torch.version.cuda}); skipped")
            continue
        devices.append(torch.device(name))

    from lopkit.data.errors import DatasetNotFoundError

    results: dict[tuple[str, str], float] = {}
    for device in devices:
        print(f"--- {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{args.threads} thread(s)'})")
        for section in sections:
            try:
                if section == "continual":
                    rates = continual_rates(device, args.steps)
                elif section == "bitflip":
                    rates = bitflip_rates(device, args.bitflip_steps, args.seeds)
                else:
                    rates = moe_rates(device, args.moe_steps, args.moe_batch)
            except DatasetNotFoundError as err:
                print(f"  {section}: skipped ({str(err).splitlines()[0]})")
                continue
            for what, rate in rates.items():
                results[(what, str(device))] = rate
                print(f"  {what:<48} {rate:12.1f} steps/s")

    names = list(dict.fromkeys(what for what, _ in results))
    columns = [str(d) for d in devices]
    print(f"{'steps/s':<48}" + "".join(f"{c:>14}" for c in columns) + ("  cuda/cpu" if len(columns) > 1 else ""))
    for what in names:
        cells = [results.get((what, c)) for c in columns]
        line = f"{what:<48}" + "".join(f"{v:14.1f}" if v is not None else f"{'-':>14}" for v in cells)
        if len(columns) > 1 and None not in cells[:2]:
            line += f"  {cells[1] / cells[0]:8.2f}"
        print(line)
        if args.record:
            for column, value in zip(columns, cells):
                if value is not None:
                    record(f"gpu_throughput/{what}/{column}", "gpu_throughput.py", f"{value:.1f} steps/s",
                           threads=args.threads, device=column)


if __name__ == "__main__":
    main()
