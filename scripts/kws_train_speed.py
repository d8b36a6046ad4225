"""Time one epoch of ``kws_train`` per model kind, split into its parts (issue 19: training speed).

Usage::

    PYTHONPATH=src python scripts/kws_train_speed.py CORPUS_DIR [--kinds heimdal,dnn_hmm] [--threads 1]
        [--preset mini] [--epochs 1] [--set key=value ...]

Prints, per model kind, wall and CPU seconds of: building the benchmark (features from the cache, targets, model),
the training steps (split into forward, backward, optimiser, the rest of the step: batch gather,
augmentation and loss), the epoch-end validations, and the load average before and after. No checkpoints are written
(the pipeline's runner adds about 20 commits per run, a few seconds in all). Run it against another checkout with
its ``src`` first on PYTHONPATH to compare code versions on the same corpus.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager


class Clock:
    """Accumulates wall and CPU seconds per named part."""

    def __init__(self) -> None:
        self.parts: dict[str, list[float]] = {}

    @contextmanager
    def part(self, name: str):
        """Time the enclosed block under ``name``."""
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            total = self.parts.setdefault(name, [0.0, 0.0])
            total[0] += time.perf_counter() - wall
            total[1] += time.process_time() - cpu


def main() -> None:
    """Parse the arguments, time each kind, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus_dir")
    parser.add_argument("--kinds", default="heimdal,dnn_hmm")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], help="train config overrides key=value")
    parser.add_argument("--no-heap-reuse", action="store_true",
                        help="keep glibc's default allocation policy (the kws CLI turns heap reuse on)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from lopkit.kws import train

    KWSTrainBenchmark = train.KWSTrainBenchmark
    reuse = getattr(train, "keep_freed_memory_for_reuse", None)  # absent in checkouts before issue 19's speed-up
    heap_reuse = bool(reuse and not args.no_heap_reuse and reuse())
    overrides = dict(item.split("=", 1) for item in args.set)
    print(f"threads {args.threads}, preset {args.preset}, epochs {args.epochs}, heap reuse {heap_reuse}, "
          f"load {os.getloadavg()}")
    for kind in args.kinds.split(","):
        clock = Clock()
        config = KWSTrainBenchmark.make_config(args.preset, {"corpus_dir": args.corpus_dir, "model_kind": kind,
                                                             "epochs": args.epochs, **overrides})
        with clock.part("build"):
            bench = KWSTrainBenchmark(config, args.seed)
        model, optimizer = bench.model, bench.optimizer
        forward, backward = model.forward, torch.Tensor.backward
        validate = bench._validate
        in_validation = [False]

        def timed_forward(*a, **k):
            if in_validation[0]:
                return forward(*a, **k)
            with clock.part("forward"):
                return forward(*a, **k)

        def timed_backward(self, *a, **k):
            with clock.part("backward"):
                return backward(self, *a, **k)

        opened = []

        def step_began(*_):
            opened.append(clock.part("optimizer"))
            opened[-1].__enter__()

        def step_ended(*_):
            opened.pop().__exit__(None, None, None)

        def timed_validate():
            in_validation[0] = True
            try:
                with clock.part("validation"):
                    return validate()
            finally:
                in_validation[0] = False

        model.forward, bench._validate = timed_forward, timed_validate
        optimizer.register_step_pre_hook(step_began)
        optimizer.register_step_post_hook(step_ended)
        torch.Tensor.backward = timed_backward
        load_before = os.getloadavg()
        try:
            with clock.part("run"):
                bench.run(bench.total_steps)
        finally:
            torch.Tensor.backward = backward
        run_wall, run_cpu = clock.parts.pop("run")
        inner = {k: v for k, v in clock.parts.items() if k != "build"}
        rest = [run_wall - sum(v[0] for v in inner.values()), run_cpu - sum(v[1] for v in inner.values())]
        print(f"\n{kind}: {bench.total_steps} steps ({bench._batches_per_epoch} per epoch), "
              f"{min(len(bench.val_data), config.val_max_clips)} val clips, load {load_before} -> {os.getloadavg()}")
        for name, (wall, cpu) in [*clock.parts.items(), ("rest of the step", rest), ("run total", [run_wall, run_cpu])]:
            print(f"  {name:18s} wall {wall:8.1f} s   cpu {cpu:8.1f} s")
        per_epoch = run_wall * bench._batches_per_epoch / bench.total_steps
        print(f"  per epoch: wall {per_epoch:.1f} s, cpu {run_cpu * bench._batches_per_epoch / bench.total_steps:.1f} s;"
              f" per step: wall {run_wall / bench.total_steps:.2f} s, cpu {run_cpu / bench.total_steps:.2f} s")


if __name__ == "__main__":
    main()
