"""A test-only benchmark whose run kills its own process (SIGKILL) at a chosen step: a worker lost to a crash or
an out-of-memory kill. Imported by the sweep tests; sweep workers import it too (it is registered outside lopkit)."""

from __future__ import annotations

import dataclasses
import os
import signal
from typing import Any

from lopkit.benchmarks.base import register_benchmark
from lopkit.benchmarks.toy import ToyBenchmark, ToyConfig
from lopkit.configs import require


@dataclasses.dataclass
class KillToyConfig(ToyConfig):
    """The toy config plus the step at which the run's process kills itself."""

    kill_at_step: int = 0
    """SIGKILL this process when a step starts at this step count (0 = never)."""

    def validate(self) -> None:
        """The toy's checks plus a non-negative kill step."""
        super().validate()
        require(self.kill_at_step >= 0, f"kill_at_step must be >= 0, got {self.kill_at_step}")


@register_benchmark
class KillToyBenchmark(ToyBenchmark):
    """The toy regression, except that its process dies by SIGKILL at ``kill_at_step`` (also after a resume)."""

    name = "toy_kill"
    Config = KillToyConfig
    description = "Test only: the toy benchmark whose process kills itself at kill_at_step."

    def _train_step(self) -> list[dict[str, Any]]:
        """One toy step, or SIGKILL of this process at ``kill_at_step``."""
        if self.config.kill_at_step and self.step == self.config.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return super()._train_step()
