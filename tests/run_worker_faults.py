"""A test-only benchmark whose run of one chosen seed raises at step 5: one failing part of ``lopkit run --workers``.

Imported by tests/test_run_workers.py; the spawned workers import it too (it is registered outside lopkit)."""

from __future__ import annotations

import dataclasses
from typing import Any

from lopkit.benchmarks.base import register_benchmark
from lopkit.benchmarks.toy import ToyBenchmark, ToyConfig


@dataclasses.dataclass
class FailSeedToyConfig(ToyConfig):
    """The toy config plus the seed whose run fails."""

    fail_seed: int = -1
    """The run of this seed raises RuntimeError when its step 5 starts (-1 = none)."""


@register_benchmark
class FailSeedToyBenchmark(ToyBenchmark):
    """The toy regression, except that the run of ``fail_seed`` raises at step 5."""

    name = "toy_fail_seed"
    Config = FailSeedToyConfig
    description = "Test only: the toy benchmark whose run of fail_seed raises at step 5."

    def _train_step(self) -> list[dict[str, Any]]:
        """One toy step, or a RuntimeError for ``fail_seed`` at step 5."""
        if self.seed == self.config.fail_seed and self.step == 5:
            raise RuntimeError(f"planned failure of seed {self.seed} at step 5")
        return super()._train_step()
