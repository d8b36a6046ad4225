"""The bit-flipping ("slowly-changing regression") stream of Dohare et al., used as experiment E3.

Input at every step: ``m`` bits plus a constant bias input of 1, laid out as
``[f flipping bits | m - f random bits | 1]``. The ``f`` flipping bits stay fixed except that every
``T`` steps one of them, chosen uniformly at random, is inverted; the other ``m - f`` bits are resampled
i.i.d. uniform at every step. Targets come from a fixed random teacher with ``hidden_units`` linear
threshold units (LTUs): all weights, including the bias weight and the output bias, are random +-1;
``h_i = 1[w_i . x >= theta_i]`` with ``theta_i = (m + 1) * beta - S_i``, and ``y = w_out . h + b_out``.

Threshold choice (spec ``lop_paper.md`` sections 4.4 and 8.10, ``fidelity_notes.md``). The paper's text
writes ``m * beta``; both reference codes use ``(m + 1) * beta`` because the bias is an input, and so do we.
For ``S_i`` three readings exist, selectable with ``BitFlipConfig.threshold_rule``:

* ``"spec_text"`` (default): ``S_i`` = (negatives among the m bit weights) - b_i/2, the rule of the paper's
  own ("Barriers") bit-flipping code and of the spec's wording.
* ``"dohare_code"``: ``S_i = (m - sum_j w_ij + b_i) / 2`` = (negatives among the m bit weights) + b_i/2,
  the formula in Dohare et al.'s ``FixLTUNet``.
* ``"count_with_bias"``: lopkit's own reading, in neither reference code: ``S_i`` = number of negative
  weights among all ``m + 1`` input weights, the bias weight counted as an input. It equals ``"spec_text"``
  plus 0.5, i.e. every threshold 0.5 lower. Kept for comparison with older lopkit runs only.

Slow bits (``BitFlipConfig.flip_mode``): ``"one"`` (default) inverts one of the f bits, chosen uniformly, every
T steps (both papers' description; Dohare et al.'s ``cfg/flip_one``); ``"redraw"`` redraws all f bits uniformly
every T steps (what Dohare et al.'s default ``cfg/prob.json`` does, as it leaves ``flip_one`` unset).

With the default beta = 0.7 every threshold is non-integer, so ``>=`` versus ``>`` in the LTU does not
matter. Time is counted in *steps*: one call of :meth:`BitFlipStream.next_batch` is one step whatever the
batch size (the paper's learner uses batch 1, where a step is one example), and the state after a call
already describes the next step (a flip due at step ``kT`` is applied as soon as step ``kT - 1`` is done).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from lopkit.data.seeding import seeded_generator

__all__ = ["FLIP_MODES", "THRESHOLD_RULES", "BitFlipConfig", "BitFlipStream", "ltu_thresholds", "run_inputs_at"]

THRESHOLD_RULES = ("count_with_bias", "dohare_code", "spec_text")
FLIP_MODES = ("one", "redraw")
_TEACHER_STREAM, _FLIP_STREAM, _BITS_STREAM, _PROBE_STREAM = 1, 2, 3, 4
_TARGET_CHUNK = 1 << 15  # rows per chunk when evaluating the teacher on many inputs


def _check_int(value: Any, name: str, minimum: int) -> None:
    """Raise ValueError unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class BitFlipConfig:
    """Sizes of the bit-flipping problem (defaults: the paper's m=20, f=15, T=10,000, 100 LTUs, beta=0.7)."""

    num_bits: int = 20  # m, input bits excluding the bias input
    num_flipping_bits: int = 15  # f, slowly changing bits
    flip_period: int = 10_000  # T, steps between two flips
    hidden_units: int = 100  # LTUs in the teacher ("size of the data generating function")
    beta: float = 0.7  # LTU threshold parameter
    threshold_rule: str = "spec_text"  # how S_i is counted, see module docstring
    flip_mode: str = "one"  # "one": invert one random slow bit every T (the papers); "redraw": redraw all f

    def __post_init__(self) -> None:
        _check_int(self.num_bits, "num_bits", 1)
        _check_int(self.num_flipping_bits, "num_flipping_bits", 0)
        if self.num_flipping_bits > self.num_bits:
            raise ValueError(
                f"num_flipping_bits={self.num_flipping_bits} cannot exceed num_bits={self.num_bits}"
            )
        _check_int(self.flip_period, "flip_period", 1)
        _check_int(self.hidden_units, "hidden_units", 1)
        if not np.isfinite(self.beta):
            raise ValueError(f"beta must be finite, got {self.beta!r}")
        if self.threshold_rule not in THRESHOLD_RULES:
            raise ValueError(f"threshold_rule must be one of {THRESHOLD_RULES}, got {self.threshold_rule!r}")
        if self.flip_mode not in FLIP_MODES:
            raise ValueError(f"flip_mode must be one of {FLIP_MODES}, got {self.flip_mode!r}")

    @property
    def input_dim(self) -> int:
        """Width of an input row: m bits plus the constant bias input."""
        return self.num_bits + 1

    @property
    def num_random_bits(self) -> int:
        """m - f bits resampled at every step."""
        return self.num_bits - self.num_flipping_bits


def ltu_thresholds(
    input_weights: torch.Tensor, beta: float = 0.7, rule: str = "spec_text"
) -> torch.Tensor:
    """LTU thresholds theta_i = (m + 1) * beta - S_i for weights (H, m + 1) whose last column is the bias."""
    if input_weights.ndim != 2 or input_weights.shape[1] < 2:
        raise ValueError(f"input_weights must be (hidden, m + 1) with m >= 1, got {tuple(input_weights.shape)}")
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"rule must be one of {THRESHOLD_RULES}, got {rule!r}")
    weights = input_weights.to(torch.float64)
    bit_weights, bias_weight = weights[:, :-1], weights[:, -1]
    negatives = (bit_weights < 0).sum(dim=1).to(torch.float64)
    if rule == "count_with_bias":
        s = negatives + (bias_weight < 0).to(torch.float64)
    elif rule == "dohare_code":
        s = negatives + 0.5 * bias_weight
    else:
        s = negatives - 0.5 * bias_weight
    return (weights.shape[1] * beta - s).to(torch.float32)


def _random_signs(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Tensor of i.i.d. uniform +-1 values (float32)."""
    return torch.randint(0, 2, shape, generator=generator, dtype=torch.float32) * 2 - 1


class BitFlipStream:
    """Seeded, exactly resumable bit-flipping regression stream with a fixed LTU teacher.

    Three private generators (teacher, flips, random bits) are derived from ``seed``; the teacher is
    drawn once at construction. ``next_batches(n)`` is a vectorised equivalent of ``n`` calls of
    ``next_batch(1)`` for long batch-1 runs.
    """

    def __init__(self, config: BitFlipConfig | None = None, seed: int = 0) -> None:
        self.config = config if config is not None else BitFlipConfig()
        if not isinstance(self.config, BitFlipConfig):
            raise ValueError(f"config must be a BitFlipConfig, got {type(self.config).__name__}")
        self.seed = seed
        cfg = self.config
        teacher = seeded_generator(seed, _TEACHER_STREAM)
        self.input_weights = _random_signs((cfg.hidden_units, cfg.input_dim), teacher)  # last column: bias
        self.output_weights = _random_signs((cfg.hidden_units,), teacher)
        self.output_bias = _random_signs((1,), teacher)
        self.thresholds = ltu_thresholds(self.input_weights, cfg.beta, cfg.threshold_rule)
        self._flip_generator = seeded_generator(seed, _FLIP_STREAM)
        self._bit_generator = seeded_generator(seed, _BITS_STREAM)
        self._flip_bits = torch.randint(
            0, 2, (cfg.num_flipping_bits,), generator=self._flip_generator, dtype=torch.float32
        )
        self.step = 0  # steps taken so far (= index of the next step)
        self.num_flips = 0  # flips applied so far
        self.last_flipped_bit: int | None = None

    # ----- teacher -------------------------------------------------------------------------------
    def teacher_features(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher LTU outputs h (N, hidden) in {0, 1} for inputs x (N, m + 1)."""
        if x.ndim != 2 or x.shape[1] != self.config.input_dim:
            raise ValueError(f"x must be (N, {self.config.input_dim}), got {tuple(x.shape)}")
        pre_activation = x.to(torch.float32) @ self.input_weights.T
        return (pre_activation >= self.thresholds).to(torch.float32)

    def targets(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher outputs y (N, 1) = w_out . h(x) + b_out, evaluated in chunks to bound memory."""
        out = torch.empty(x.shape[0], 1, dtype=torch.float32)
        for start in range(0, x.shape[0], _TARGET_CHUNK):
            h = self.teacher_features(x[start : start + _TARGET_CHUNK])
            out[start : start + _TARGET_CHUNK, 0] = h @ self.output_weights + self.output_bias
        return out

    # ----- stream --------------------------------------------------------------------------------
    @property
    def flip_bits(self) -> torch.Tensor:
        """Current values (f,) of the flipping bits, i.e. those the next step will use."""
        return self._flip_bits.clone()

    def _next_flip_state(self, state: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The slow bits after a boundary: one bit inverted (``flip_mode="one"``) or all f redrawn (``"redraw"``)."""
        generator = self._flip_generator if generator is None else generator
        f = self.config.num_flipping_bits
        if self.config.flip_mode == "redraw":
            self.last_flipped_bit = None
            return torch.randint(0, 2, (f,), generator=generator, dtype=torch.float32)
        bit = int(torch.randint(f, (1,), generator=generator))
        self.last_flipped_bit = bit
        result = state.clone()
        result[bit] = 1.0 - result[bit]
        return result

    def _assemble(self, flip_rows: torch.Tensor, random_bits: torch.Tensor) -> torch.Tensor:
        """Concatenate flipping bits, random bits and the bias column into inputs (N, m + 1)."""
        bias = torch.ones(random_bits.shape[0], 1, dtype=torch.float32)
        return torch.cat([flip_rows, random_bits, bias], dim=1)

    def _random_bits(self, rows: int) -> torch.Tensor:
        """Fresh uniform bits (rows, m - f) from the stream's bit generator."""
        return torch.randint(
            0, 2, (rows, self.config.num_random_bits), generator=self._bit_generator, dtype=torch.float32
        )

    def next_batch(self, batch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """One step: ``batch_size`` inputs (B, m + 1) and targets (B, 1) from the current distribution."""
        _check_int(batch_size, "batch_size", 1)
        x = self._assemble(self._flip_bits.expand(batch_size, -1), self._random_bits(batch_size))
        y = self.targets(x)
        self.step += 1
        if self.config.num_flipping_bits and self.step % self.config.flip_period == 0:
            self._flip_bits = self._next_flip_state(self._flip_bits)
            self.num_flips += 1
        return x, y

    def next_batches(self, n_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n_steps`` batch-1 steps at once: inputs (n, m + 1), targets (n, 1); equals n next_batch(1) calls."""
        _check_int(n_steps, "n_steps", 1)
        cfg = self.config
        random_bits = self._random_bits(n_steps)
        start, period = self.step, cfg.flip_period
        states, lengths, row = [self._flip_bits.clone()], [], 0
        if cfg.num_flipping_bits:
            first_boundary = (start // period + 1) * period
            for boundary in range(first_boundary, start + n_steps + 1, period):
                lengths.append(boundary - start - row)
                row = boundary - start
                states.append(self._next_flip_state(states[-1]))
                self.num_flips += 1
        lengths.append(n_steps - row)
        flip_rows = torch.repeat_interleave(torch.stack(states), torch.tensor(lengths), dim=0)
        x = self._assemble(flip_rows, random_bits)
        self._flip_bits = states[-1]
        self.step += n_steps
        return x, self.targets(x)

    def probe_batch(self, n: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed batch (n inputs and targets) from the *current* distribution; does not advance the stream."""
        _check_int(n, "n", 1)
        generator = seeded_generator(seed, _PROBE_STREAM)
        bits = torch.randint(0, 2, (n, self.config.num_random_bits), generator=generator, dtype=torch.float32)
        x = self._assemble(self._flip_bits.expand(n, -1), bits)
        return x, self.targets(x)

    # ----- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the stream exactly: teacher, flip state, counters, RNG states."""
        return {
            "config": asdict(self.config),
            "seed": self.seed,
            "step": self.step,
            "num_flips": self.num_flips,
            "last_flipped_bit": self.last_flipped_bit,
            "flip_bits": self._flip_bits.clone(),
            "flip_generator_state": self._flip_generator.get_state(),
            "bit_generator_state": self._bit_generator.get_state(),
            "input_weights": self.input_weights.clone(),
            "output_weights": self.output_weights.clone(),
            "output_bias": self.output_bias.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the batches that follow are identical to the saved stream's."""
        if state.get("config") != asdict(self.config):
            raise ValueError(
                f"state_dict was saved with config {state.get('config')}, but this stream has "
                f"{asdict(self.config)}; build the stream with the saved BitFlipConfig"
            )
        self.seed = state["seed"]
        self.step, self.num_flips = int(state["step"]), int(state["num_flips"])
        self.last_flipped_bit = state["last_flipped_bit"]
        self._flip_bits = state["flip_bits"].clone().to(torch.float32)
        self._flip_generator.set_state(state["flip_generator_state"].clone())
        self._bit_generator.set_state(state["bit_generator_state"].clone())
        self.input_weights = state["input_weights"].clone().to(torch.float32)
        self.output_weights = state["output_weights"].clone().to(torch.float32)
        self.output_bias = state["output_bias"].clone().to(torch.float32)
        self.thresholds = ltu_thresholds(self.input_weights, self.config.beta, self.config.threshold_rule)


def run_inputs_at(config: BitFlipConfig, seed: int, steps: torch.Tensor) -> torch.Tensor:
    """Inputs (len(steps), m + 1) that the stream of ``(config, seed)`` yields at the given 0-based ``steps``.

    Replays the flips and random bits of a fresh stream up to ``max(steps)`` (no teacher evaluation), so the
    rows are exactly those a batch-1 run sees at those steps, whatever flip state they fall in.
    """
    steps = torch.as_tensor(steps, dtype=torch.long).reshape(-1)
    if steps.numel() == 0 or int(steps.min()) < 0:
        raise ValueError(f"steps must be a non-empty list of non-negative step indices, got {steps.tolist()[:5]}")
    stream = BitFlipStream(config, seed)
    out = torch.empty(steps.numel(), config.input_dim, dtype=torch.float32)
    order = torch.argsort(steps, stable=True)
    sorted_steps = steps[order]
    chunk = 1 << 18
    position = 0
    for start in range(0, int(sorted_steps[-1]) + 1, chunk):
        length = min(chunk, int(sorted_steps[-1]) + 1 - start)
        bits = stream._random_bits(length)
        flip_state = stream._flip_bits.clone()
        period = config.flip_period
        while position < len(sorted_steps) and int(sorted_steps[position]) < start + length:
            step = int(sorted_steps[position])
            # flips between the chunk start and this step (replayed on a copy: the chunk's flips happen below)
            out[order[position], : config.num_flipping_bits] = _flip_state_at(stream, flip_state, start, step)
            out[order[position], config.num_flipping_bits : -1] = bits[step - start]
            out[order[position], -1] = 1.0
            position += 1
        if config.num_flipping_bits:
            for _boundary in range((start // period + 1) * period, start + length + 1, period):
                stream._flip_bits = stream._next_flip_state(stream._flip_bits)
        stream.step += length
    return out


def _flip_state_at(stream: BitFlipStream, state: torch.Tensor, start: int, step: int) -> torch.Tensor:
    """Flip bits at ``step`` given ``state`` at ``start``: replays the flips in between on a cloned generator."""
    cfg = stream.config
    if not cfg.num_flipping_bits:
        return state
    boundaries = range((start // cfg.flip_period + 1) * cfg.flip_period, step + 1, cfg.flip_period)
    if len(boundaries) == 0:
        return state
    generator = torch.Generator().manual_seed(0)
    generator.set_state(stream._flip_generator.get_state())
    last = stream.last_flipped_bit
    result = state.clone()
    for _ in boundaries:
        result = stream._next_flip_state(result, generator)
    stream.last_flipped_bit = last
    return result
