"""Methods inside the bit-flipping benchmark's lean engine: kernels that reproduce a method's hooks in NumPy.

The lean engine (:func:`lopkit.benchmarks.bitflip.lean_sgd_block`) trains the two-layer learner with a
hand-written forward/backward/update. A *lean kernel* adds one mitigation to that loop without a torch forward,
autograd or per-step hook call, giving the rows of the autograd engine within float tolerance:

- ``cbp``/``cbp_aggressive`` (:class:`LeanCBP`): the engine writes each step's hidden features ``h`` and the
  post-step weights into a record; the utilities of Dohare's ``gnt.py`` (running mean, bias-corrected
  deviation, |w_out| / |w_in|, running utility, all in float64 as :class:`~lopkit.mitigations.resets.ContinualBackprop`)
  are computed from the record in one vectorised pass (the two exponential averages in closed form over
  chunks of :data:`EMA_CHUNK` steps, equal to the per-step recursion up to float64 rounding) whenever a replacement is due, the record is full or the block
  ends. Whether a replacement is due needs no utility: the number of mature units follows from the ages by
  integer arithmetic, and the coin flips of ``schedule="coin"`` are drawn ahead from the method's generator
  (rewound to where the per-step loop would stand). The replacement itself is the method's own
  ``_replace``, called on the same step as the autograd engine, so the draws of fresh weights are the same.
- ``l2``/``l2init``: the loss term's gradient ``2 strength (p - p0)`` is added to the update.
- ``shrink_perturb`` (``when="step"``, ``noise="init"``): the uniform draws of a block come from the method's
  generator at once (PyTorch's uniform draws are sequential, so they equal the per-step draws).
- ``noisy_sgd``: the relative gradient noise is drawn per tensor and step from the method's generator, in the
  order of ``model.parameters()``; the gradients are the lean engine's explicit ones.
- ``redo`` (any periodic unit method whose statistics are sums of ``h``): the record gives the window's sums;
  the check runs through the method's ``after_step`` at the step it is due.

:func:`lean_kernel` returns the kernel for a method, or None (the benchmark then uses its hooked lean step or
the autograd engine).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from lopkit.benchmarks.base import check_finite_loss
from lopkit.mitigations.base import Compose, Mitigation

__all__ = ["LeanCBP", "LeanKernel", "ema_last", "ema_sequence", "has_lean_kernel", "has_lean_kernel_type", "lean_cbp_block", "lean_cbp_supported", "lean_kernel",
           "lean_method_block", "lean_param_views"]

_RECORD_BYTES = 1 << 24  # memory of the CBP weight record (the record is flushed when full)
_COIN_CHUNK = 256  # coins drawn ahead at once
EMA_CHUNK = 32  # steps per closed-form piece of :func:`ema_sequence`


_NO_COINS = np.zeros(0, dtype=np.float64)  # an empty coin stream (coins are only ever read, never written)
_CBP_STACKED = ("utility", "mean_activation", "age")  # the CBP statistics a flush updates for all seeds at once
_LAST_WEIGHTS: dict[tuple[float, int], np.ndarray] = {}  # ema_last's weights per (eta, length)
_POWER_TABLES: dict[float, tuple[np.ndarray, bool]] = {}
_POWER_TABLE_MAX = 1 << 17  # entries of a table of eta^k (1 MiB)


def eta_powers(eta: float, ages: np.ndarray) -> np.ndarray:
    """``eta ** ages`` (float64) for integer ages >= 0, read from a table of ``np.power(eta, k)`` (the same values).

    The table runs until eta^k underflows to 0 (k ~ 74,000 for eta = 0.99), so older units read 0 exactly; for
    eta so close to 1 that the table would exceed ``_POWER_TABLE_MAX`` entries, older ages are computed directly.
    """
    table, complete = _POWER_TABLES.get(float(eta), (None, False))
    if table is None:
        table = np.power(eta, np.arange(_POWER_TABLE_MAX, dtype=np.float64))
        zeros = np.flatnonzero(table == 0.0)
        complete = len(zeros) > 0
        if complete:
            table = table[: zeros[0] + 1]
        _POWER_TABLES[float(eta)] = (table, complete)
    last = len(table) - 1
    powers = table[np.minimum(ages, last)]
    if not complete:
        beyond = ages > last
        if beyond.any():
            powers[beyond] = np.power(eta, ages[beyond].astype(np.float64))
    return powers


_DECAY_CACHE: dict[tuple[float, int], tuple[np.ndarray, np.ndarray]] = {}


def _decay_matrix(eta: float, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """``((1 - eta) eta^(t-s) for s <= t, eta^(t+1))`` for ``t, s < chunk`` (cached)."""
    key = (float(eta), int(chunk))
    if key not in _DECAY_CACHE:
        index = np.arange(chunk)
        lags = index[:, None] - index[None, :]
        decay = np.where(lags >= 0, np.power(eta, np.maximum(lags, 0).astype(np.float64)), 0.0) * (1.0 - eta)
        _DECAY_CACHE[key] = (decay, np.power(eta, (index + 1).astype(np.float64)))
    return _DECAY_CACHE[key]


def ema_sequence(values: np.ndarray, start: np.ndarray, eta: float, chunk: int = EMA_CHUNK,
                 out: np.ndarray | None = None) -> np.ndarray:
    """Running averages ``y_t = eta y_(t-1) + (1 - eta) x_t`` along axis 0 of ``values`` (T, N) from ``start`` (N,).

    Each piece of ``chunk`` steps is one product with the decay matrix ``(1 - eta) eta^(t-s)`` plus
    ``eta^(t+1)`` times the previous value: the recursion's values up to float64 rounding, without a Python
    loop over steps. ``out``: a float64 array of ``values``' shape to write into (not ``values`` itself).
    """
    decay, powers = _decay_matrix(eta, chunk)
    if out is None:
        out = np.empty(values.shape, dtype=np.float64)
    previous = np.asarray(start, dtype=np.float64)
    for first in range(0, values.shape[0], chunk):
        n = min(chunk, values.shape[0] - first)
        piece = out[first : first + n]
        np.matmul(decay[:n, :n], values[first : first + n], out=piece)
        piece += powers[:n, None] * previous[None, :]
        previous = piece[-1]
    return out


def ema_last(values: np.ndarray, start: np.ndarray, eta: float) -> np.ndarray:
    """The last value of :func:`ema_sequence` (one product with the weights ``(1 - eta) eta^(T-1-t)``)."""
    n = values.shape[0]
    key = (float(eta), n)
    weights = _LAST_WEIGHTS.get(key)
    if weights is None:
        weights = _LAST_WEIGHTS[key] = np.power(eta, np.arange(n - 1, -1, -1, dtype=np.float64)) * (1.0 - eta)
    return weights @ values + eta**n * np.asarray(start, dtype=np.float64)


def _single(method: Mitigation) -> Mitigation | None:
    """The one method of ``method`` (a composition of one is unwrapped); None for a composition of several."""
    while isinstance(method, Compose):
        if len(method.methods) != 1:
            return None
        method = method.methods[0]
    return method


def learner_layers(model: nn.Module) -> tuple[nn.Linear, nn.Module, nn.Linear]:
    """The (hidden Linear, activation, output Linear) modules of the two-layer learner."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    activations = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    if len(linears) != 2 or len(activations) != 1:
        raise ValueError(
            f"the bit-flipping learner must have exactly two nn.Linear layers and one nn.ReLU, got "
            f"{len(linears)} Linear and {len(activations)} ReLU"
        )
    return linears[0], activations[0], linears[1]




def lean_cbp_supported(method: Mitigation, model: nn.Module) -> bool:
    """Whether :class:`LeanCBP` runs ``method``: exactly ``cbp`` or ``cbp_aggressive`` on the learner's one unit group."""
    from lopkit.mitigations.resets import AggressiveContinualBackprop, ContinualBackprop

    method = _single(method)
    if type(method) not in (ContinualBackprop, AggressiveContinualBackprop) or method.generator is None:
        return False
    hidden, _activation, output = learner_layers(model)
    groups = method.groups
    return (len(groups) == 1 and groups[0].incoming is hidden and groups[0].outgoing is output
            and not groups[0].is_conv and groups[0].outgoing_block == 1)


class LeanCBP:
    """Continual backprop (``cbp``, ``cbp_aggressive``) for S learners trained by a lean engine (S = 1: one run).

    Per step the engine writes ``h`` into ``rec_h[k, s]``, the post-step ``|w2|`` into ``rec_w2[k, s]`` and, when
    :attr:`needs_incoming` (``adaptable_contribution``), each unit's incoming weight magnitude into ``rec_in[k, s]``
    (:meth:`record_incoming`), then calls :meth:`step`. Between :meth:`begin` and :meth:`finish` the methods'
    statistics lag the record; after :meth:`finish` they, the generators and the counters are what the per-step
    hooks would have left. Recording the (S, H) magnitudes rather than |W1| itself keeps the record small and a
    flush (one per replacement, for all seeds at once) cheap.
    """

    def __init__(self, methods: Sequence[Mitigation], models: Sequence[nn.Module],
                 optimizers: Sequence[torch.optim.Optimizer], capacity: int | None = None, transposed: bool = False,
                 bias_row: bool = False):
        from lopkit.mitigations.resets import AggressiveContinualBackprop

        self.methods = [_single(m) for m in methods]
        self.models, self.optimizers = list(models), list(optimizers)
        first = self.methods[0]
        self.config = first.config
        self.aggressive = type(first) is AggressiveContinualBackprop
        hidden, _activation, _output = learner_layers(self.models[0])
        units, inputs = hidden.weight.shape
        self.units = units
        self.cols = inputs - 1 if first._constant_column(0) else inputs
        self.eps = first._in_epsilon
        self.native = self._native_replacement()
        if self.native:
            from lopkit.mitigations.layers import _weight_scale, activation_gain

            group = first.groups[0]
            self.init_scale = _weight_scale(group.incoming.weight, self.config.init, activation_gain(group.activation))
            self.bias_scale = 1.0 / math.sqrt(inputs)
        size = len(self.methods)
        if capacity is None:
            capacity = max(8, min(1024, _RECORD_BYTES // (4 * size * units * 3)))
        self.capacity = capacity
        self.rec_h = np.zeros((capacity, size, units), dtype=np.float32)
        self.rec_w2 = np.zeros((capacity, size, units), dtype=np.float64)  # |w2| after the step
        self.needs_incoming = self.config.utility_type == "adaptable_contribution"
        self.rec_in = np.zeros((capacity, size, units) if self.needs_incoming else (0,), dtype=np.float32)
        # the engine's W1 is (H, D), or (S, D (+ 1), H) when transposed (bias_row: b1 as the last row)
        self.transposed = transposed
        rows = inputs + int(bias_row)
        self.in_weights = np.ones(rows, dtype=np.float32)  # |W1| row sums as a product; 0: constant column, bias
        self.in_weights[self.cols :] = 0.0
        # |W1| of all seeds at one step (transposed engine only)
        self._magnitude = np.zeros((size, rows, units) if self.needs_incoming and transposed else (0,),
                                   dtype=np.float32)
        # one learner (not transposed): |W1| itself per step, summed at the flush (one product over all records)
        self.rec_w1 = np.zeros((capacity, units, rows) if self.needs_incoming and not transposed else (0,),
                               dtype=np.float32)
        # float64 work arrays of a flush ((n, S, H) each) and eta^t for t = 1..capacity
        self._work = np.zeros((3, capacity, size, units), dtype=np.float64)
        self._eta_steps = np.power(self.config.decay_rate, np.arange(1, capacity + 1, dtype=np.float64))
        self.k = 0

    def record_incoming(self, w1: np.ndarray) -> None:
        """Write each unit's incoming weight magnitude ``|W1| @ in_weights`` of the current step into ``rec_in[k]``.

        ``w1``: the engine's (H, D) weight of one learner, or (S, D + 1, H) of all seeds when ``transposed``.
        """
        if self.transposed:  # (rows,) @ (S, rows, H): one matrix-vector product per seed
            np.matmul(self.in_weights, np.abs(w1, out=self._magnitude), out=self.rec_in[self.k])
        else:  # a copy now, the sums at the flush
            np.abs(w1, out=self.rec_w1[self.k])

    def _native_replacement(self) -> bool:
        """Whether the replacement can run in NumPy here (uniform draws only; else the method's own ``_replace``)."""
        cfg = self.config
        uniform = cfg.init in ("default", "kaiming_uniform", "xavier_uniform")
        if self.aggressive:
            return uniform or not cfg.redraw_incoming
        return uniform and not cfg.bias_correction

    # ------------------------------------------------------------------ block bookkeeping

    def begin(self, length: int) -> None:
        """Start a block of ``length`` steps: views of the statistics, maturity thresholds, coins drawn ahead."""
        self.k = 0
        self.time = 0  # steps since begin
        self.length = length
        self.states = [m.stats[0] for m in self.methods]
        # during the block every seed's statistics are rows of one (S, H) tensor per name, so a flush updates
        # all seeds at once; the methods' state entries are those rows (views) until :meth:`finish`
        self.stacked = {name: torch.stack([state[name] for state in self.states]) for name in _CBP_STACKED}
        for index, state in enumerate(self.states):
            for name in _CBP_STACKED:
                state[name] = self.stacked[name][index]
        self.utility_all, self.mean_all, self.age_all = (self.stacked[name].numpy() for name in _CBP_STACKED)
        self.utility, self.mean, self.age = list(self.utility_all), list(self.mean_all), list(self.age_all)
        self.accumulated = [float(s["accumulated"]) for s in self.states]
        self.params = [lean_param_views(model) for model in self.models]
        self.native_now = self.native and all(len(o.state) == 0 for o in self.optimizers)
        self.thresholds: list[list[int]] = [[] for _ in self.methods]
        self.pointer = [0] * len(self.methods)
        self.saved: list[torch.Tensor | None] = [None] * len(self.methods)
        self.coins: list[np.ndarray] = [_NO_COINS for _ in self.methods]
        self.used = [0] * len(self.methods)
        for s in range(len(self.methods)):
            self._thresholds(s)
            self._draw_coins(s)
        cfg = self.config
        self.coin_plan = not self.aggressive and cfg.schedule == "coin" and cfg.replacement_rate > 0
        self.seen = [0] * len(self.methods)
        self.next_time: list[float] = [0] * len(self.methods)
        if self.coin_plan:
            for s in range(len(self.methods)):
                self._plan(s)
            self.next_any = min(self.next_time)

    def _thresholds(self, s: int) -> None:
        """Times (steps since begin) at which seed ``s``'s units become mature: age = time - birth > maturity."""
        maturity = self.config.maturity
        births = self.time - self.k - self.age[s]  # the ages lag the unflushed records
        self.thresholds[s] = sorted((births + maturity + 1).tolist())
        pointer, thresholds = 0, self.thresholds[s]
        while pointer < len(thresholds) and thresholds[pointer] <= self.time:
            pointer += 1
        self.pointer[s] = pointer

    def _draw_coins(self, s: int) -> None:
        """Start seed ``s``'s stream of uniform draws (coins, fresh weights) ahead of use (rewound by :meth:`_rewind`)."""
        generator = self.methods[s].generator
        self.saved[s] = generator.get_state()
        self.coins[s] = _NO_COINS
        self.used[s] = 0

    def _more_coins(self, s: int, needed: int = 1) -> None:
        """Extend seed ``s``'s stream by at least ``needed`` draws (the generator continues where it stopped)."""
        size = max(needed, min(_COIN_CHUNK, self.length - self.time + 1))
        more = torch.rand(size, generator=self.methods[s].generator, dtype=torch.float64).numpy()
        self.coins[s] = np.concatenate([self.coins[s], more])

    def _take(self, s: int, count: int) -> np.ndarray:
        """The next ``count`` uniform draws of seed ``s``'s stream."""
        used = self.used[s]
        if used + count > len(self.coins[s]):
            self._more_coins(s, used + count - len(self.coins[s]))
        self.used[s] = used + count
        return self.coins[s][used : used + count].copy()

    def _rewind(self, s: int, used: int) -> None:
        """Put seed ``s``'s generator where the per-step loop would be after ``used`` of the drawn coins."""
        if self.saved[s] is None:
            return
        generator = self.methods[s].generator
        generator.set_state(self.saved[s])
        if used:
            torch.rand(used, generator=generator, dtype=torch.float64)
        self.saved[s] = None

    def _plan(self, s: int) -> None:
        """Coin schedule: the next time seed ``s`` needs a look (a unit matures or a coin falls under the rate)."""
        time, pointer = self.time, self.pointer[s]
        threshold = self.thresholds[s][pointer] if pointer < self.units else math.inf
        self.seen[s] = time
        expected = self.config.replacement_rate * pointer
        if pointer == 0:
            self.next_time[s] = threshold
            return
        if expected >= 1.0:
            self.next_time[s] = time + 1
            return
        horizon = int(min(threshold, self.length + 1) - time)  # steps until the next maturity (or the block end)
        used = self.used[s]
        if used + horizon > len(self.coins[s]):
            self._more_coins(s, used + horizon - len(self.coins[s]))
        hits = np.flatnonzero(self.coins[s][used : used + horizon] <= expected)
        self.next_time[s] = min(threshold, time + 1 + int(hits[0])) if len(hits) else threshold

    def _step_coin(self) -> None:
        """:meth:`step` for the coin schedule: only the seeds whose planned time has come are looked at."""
        time = self.time
        if time >= self.next_any:
            for s in range(len(self.methods)):
                if self.next_time[s] == time:
                    if self.pointer[s]:  # the coins of the steps since the last look (all above the rate)
                        self.used[s] += time - 1 - self.seen[s]
                    self.seen[s] = time
                    self._step_seeds([s])
                    self._plan(s)
            self.next_any = min(self.next_time)
        if self.k == self.capacity:
            self._flush()

    def step(self) -> None:
        """After one training step of every learner: advance the record; replace units where a replacement is due."""
        self.k += 1
        self.time += 1
        if self.coin_plan:
            self._step_coin()
            return
        self._step_seeds(range(len(self.methods)))
        if self.k == self.capacity:
            self._flush()

    def _step_seeds(self, seeds: Sequence[int]) -> None:
        """The per-step decisions of ``seeds`` (the hooks' ``num_to_replace``) and their replacements."""
        time = self.time
        rate = self.config.replacement_rate
        due: list[tuple[int, int, float]] = []
        for s in seeds:
            thresholds, pointer = self.thresholds[s], self.pointer[s]
            while pointer < self.units and thresholds[pointer] <= time:
                pointer += 1
            self.pointer[s] = pointer
            if pointer == 0 or rate == 0:
                continue
            if self.aggressive:
                due.append((s, min(pointer, max(1, int(math.floor(self.units * rate)))), self.used[s], 0.0))
                continue
            expected = rate * pointer
            if self.config.schedule == "accumulate":
                before = self.accumulated[s]
                after = before + expected
                count = int(math.floor(after))
                self.accumulated[s] = after - count
                if count:
                    due.append((s, min(count, pointer), 0, before))
            elif expected < 1.0:
                used = self.used[s]
                self.used[s] = used + 1
                if used == len(self.coins[s]):
                    self._more_coins(s)
                if self.coins[s][used] <= expected:
                    due.append((s, 1, used, 0.0))
            else:
                due.append((s, min(int(expected), pointer), self.used[s], 0.0))
        if due:
            self._flush()
            for s, count, used, before in due:
                if self.native_now:
                    self._replace_native(s, count)
                else:
                    self._replace(s, used, before)
                self._thresholds(s)

    def _replace(self, s: int, used: int, accumulated_before: float) -> None:
        """The method's own replacement at this step (it redraws this step's coin or redoes the accumulation)."""
        method = self.methods[s]
        self._rewind(s, used)
        if self.config.schedule == "accumulate":
            self.states[s]["accumulated"] = accumulated_before
        method._replace(0, method.groups[0], self.optimizers[s])
        self.accumulated[s] = float(self.states[s]["accumulated"])
        self._draw_coins(s)

    def _replace_native(self, s: int, count: int) -> None:
        """``_replace`` of ``cbp``/``cbp_aggressive`` in NumPy on the plain learner (same draws, same order)."""
        cfg, method = self.config, self.methods[s]
        w1, b1, w2, b2 = self.params[s]
        age, utility, mean = self.age[s], self.utility[s], self.mean[s]
        eta = cfg.decay_rate
        eligible = np.flatnonzero(age > cfg.maturity)
        correction = 1.0 - eta_powers(eta, age)
        corrected = np.where(correction > 0, utility / np.maximum(correction, 1e-300), 0.0)
        if count == 1:  # the first lowest (a stable sort's first), without sorting
            chosen = eligible[np.argmin(corrected[eligible])][None]
        else:
            chosen = eligible[np.argsort(corrected[eligible], kind="stable")[:count]]
        rows = np.sort(chosen)  # reinit_incoming and the masks go in unit order
        redraw = cfg.redraw_incoming if self.aggressive else True
        if redraw:
            draws = self._take(s, len(rows) * w1.shape[1])
            w1[rows] = ((draws * 2.0 - 1.0) * self.init_scale).reshape(len(rows), -1).astype(np.float32)
            if cfg.bias_init == "zero":
                b1[rows] = 0.0
            else:
                b1[rows] = ((self._take(s, len(rows)) * 2.0 - 1.0) * self.bias_scale).astype(np.float32)
        if self.aggressive:
            if cfg.zero_layer_bias:
                b1[:] = 0.0
            if cfg.bias_correction:
                means = np.where(correction > 0, mean / np.maximum(correction, 1e-300), 0.0)[chosen]
                b2 += np.float32(w2[chosen] @ means.astype(np.float32))
            w2[chosen] = 0.0
        else:
            w2[rows] = 0.0
            if method._constant_column(0):
                w1[rows, -1] = 0.0
        method.replaced_per_group[0] += len(rows)
        method.total_replaced += len(rows)
        utility[rows] = 0.0
        mean[rows] = 0.0
        age[rows] = 0
        method.events += 1

    def finish(self) -> None:
        """End of the block: bring the statistics up to date and rewind the generators."""
        self._flush()
        for s in range(len(self.methods)):
            if self.coin_plan and self.pointer[s]:  # coins of the steps after the last look
                self.used[s] += self.time - self.seen[s]
            self._rewind(s, self.used[s])
            self.states[s]["accumulated"] = self.accumulated[s]
            for name in _CBP_STACKED:  # the methods' own tensors again (a state_dict must not hold the stack)
                self.states[s][name] = self.stacked[name][s].clone()

    # ------------------------------------------------------------------ the utilities

    def _flush(self) -> None:
        """Bring every seed's ages, running means and utilities up to date with the record, then empty it.

        The per-step hooks' operations on (n, S, H) float64 arrays, all seeds at once (a replacement needs its
        seed's utilities; updating the other seeds too costs no more calls and keeps one record position).
        """
        n = self.k
        if n == 0:
            return
        cfg, eta = self.config, self.config.decay_rate
        h, means, scratch = self._work[:, :n]
        if self.needs_incoming and not self.transposed:
            np.matmul(self.rec_w1[:n], self.in_weights, out=self.rec_in[:n, 0])
        np.copyto(h, self.rec_h[:n])
        flat = (n, -1)
        ema_sequence(h.reshape(flat), self.mean_all.reshape(-1), eta, out=means.reshape(flat))
        if cfg.utility_type == "contribution":
            instant = np.abs(h, out=h)
        else:
            # eta^(age + t) as eta^age * eta^t: the same powers up to float64 rounding
            correction = np.multiply(self._eta_steps[:n, None, None],
                                     eta_powers(eta, self.age_all)[None], out=scratch)
            np.subtract(1.0, correction, out=correction)
            corrected = np.divide(means, correction, out=scratch)
            instant = np.abs(np.subtract(h, corrected, out=h), out=h)  # the deviation |h - mean / correction|
        instant *= self.rec_w2[:n]
        if cfg.utility_type == "adaptable_contribution":
            incoming = scratch
            np.copyto(incoming, self.rec_in[:n])
            if cfg.weight_magnitude != "sum":
                incoming /= self.cols
            incoming += self.eps
            instant /= incoming
        self.utility_all[:] = ema_last(instant.reshape(flat), self.utility_all.reshape(-1), eta).reshape(
            self.utility_all.shape)
        self.mean_all[:] = means[-1]
        self.age_all += n
        self.k = 0


def lean_param_views(model: nn.Module) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """NumPy views sharing memory with the learner's parameters (W1, b1, w2 flattened, b2); checks float32 CPU.

    Strided views are fine (a seed group's members see W1 as a transposed slice of its stacked ``[W1^T; b1]``).
    """
    hidden, _activation, output = learner_layers(model)
    tensors = (hidden.weight, hidden.bias, output.weight, output.bias)
    for tensor in tensors:
        if tensor.dtype != torch.float32 or tensor.device.type != "cpu":
            raise ValueError("the lean engine needs float32 CPU parameters; use engine='autograd'")
    w1, b1, w2, b2 = (t.detach().numpy() for t in tensors)
    return w1, b1, w2.reshape(-1), b2


def lean_cbp_block(
    params: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    inputs: np.ndarray,
    targets: np.ndarray,
    lr: float,
    loss_sum: float,
    first_step: int,
    cbp: LeanCBP,
) -> float:
    """:func:`~lopkit.benchmarks.bitflip.lean_sgd_block` with continual backprop after every step (one learner)."""
    w1, b1, w2, b2 = params
    two_lr = np.float32(2.0 * lr)
    zero = np.float32(0.0)
    rec_h, rec_w2 = cbp.rec_h[:, 0], cbp.rec_w2[:, 0]
    needs_incoming = cbp.needs_incoming
    cbp.begin(len(inputs))
    with np.errstate(over="ignore", invalid="ignore"):
        for i, (x, t) in enumerate(zip(inputs, targets)):
            k = cbp.k
            z = w1 @ x
            z += b1
            h = np.maximum(z, zero, out=rec_h[k])
            error = (w2 @ h + b2[0]) - t
            loss_sum += float(error * error)
            if not math.isfinite(loss_sum):
                check_finite_loss("bitflip", float(error * error), first_step + i, lr)
            scale = two_lr * error
            dz = w2 * (z > 0)
            dz *= scale
            w2 -= scale * h
            b2 -= scale
            w1 -= np.multiply.outer(dz, x)
            b1 -= dz
            np.abs(w2, out=rec_w2[k])
            if needs_incoming:
                cbp.record_incoming(w1)
            cbp.step()
    cbp.finish()
    return loss_sum


def lean_method_block(
    params: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    inputs: np.ndarray,
    targets: np.ndarray,
    lr: float,
    loss_sum: float,
    first_step: int,
    *,
    penalty: tuple[float, list[tuple[int, np.ndarray | None]]] | None = None,
    noise: Any = None,
    perturb: Any = None,
    record: np.ndarray | None = None,
) -> float:
    """Online SGD (batch 1, MSE) of the 2-layer ReLU learner over ``inputs`` in place, plus one method's effect.

    ``params`` are float32 NumPy views ``(W1 (H, D), b1 (H,), w2 (H,), b2 (1,))`` of the model's parameters
    (:func:`lean_param_views`). Per step: ``z = W1 x + b1``, ``h = relu(z)``, ``y = w2.h + b2``, ``e = y - t``; the
    gradient of ``e^2`` is ``2e`` times (``h`` for w2, ``1`` for b2, ``w2 * 1[z > 0]`` times (``x`` for W1, ``1``
    for b1)), exactly what autograd computes for ``mse_loss`` with ReLU'(0) = 0. The squared errors are added one
    by one in float64 to ``loss_sum`` (returned), so the sum does not depend on how the steps are split into
    blocks. A non-finite loss raises :class:`~lopkit.benchmarks.base.DivergedError` naming the step
    (``first_step`` + offset). With no method argument this is the plain lean engine
    (:func:`~lopkit.benchmarks.bitflip.lean_sgd_block`); continual backprop has its own loop
    (:func:`lean_cbp_block`), since its bookkeeping after every step is the method.

    ``penalty``: ``(2 lr strength, [(parameter index, anchor or None)])``, the loss term's gradient in the update;
    ``noise``: a :class:`_GradientNoise` (``noisy_sgd``) adding relative noise to each gradient before the update;
    ``perturb``: a :class:`_PerturbSchedule` (``shrink_perturb``) applied after the update;
    ``record``: an array (steps, H) that receives each step's hidden features ``h``.
    """
    w1, b1, w2, b2 = params
    two_lr = np.float32(2.0 * lr)
    zero = np.float32(0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        for i, (x, t) in enumerate(zip(inputs, targets)):
            z = w1 @ x
            z += b1
            h = np.maximum(z, zero) if record is None else np.maximum(z, zero, out=record[i])
            error = (w2 @ h + b2[0]) - t
            loss_sum += float(error * error)
            if not math.isfinite(loss_sum):
                check_finite_loss("bitflip", float(error * error), first_step + i, lr)
            scale = two_lr * error
            dz = w2 * (z > 0)
            dz *= scale
            if penalty is not None:
                coefficient, selected = penalty
                for index, anchor in selected:
                    p = params[index]
                    p -= coefficient * (p if anchor is None else p - anchor)
            if noise is not None:
                noise.step(first_step + i, params, dz, x, scale, h, lr)
            else:
                w2 -= scale * h
                b2 -= scale
                w1 -= np.multiply.outer(dz, x)
                b1 -= dz
            if perturb is not None:
                perturb.step(params)
    return loss_sum


class _GradientNoise:
    """``noisy_sgd``'s relative gradient noise on the lean engine's explicit gradients (method's generator and t)."""

    def __init__(self, method: Mitigation, model: nn.Module, flip_period: int):
        self.method, self.flip_period = method, flip_period
        self.buffers = [torch.empty(p.shape, dtype=p.dtype) for p in model.parameters()]
        self.arrays = [b.numpy().reshape(-1) for b in self.buffers]

    def step(self, index: int, params: tuple[np.ndarray, ...], dz: np.ndarray, x: np.ndarray, scale: Any,
             h: np.ndarray, lr: float) -> None:
        """One update ``p -= lr (g + sigma_t ||g|| eps)`` of all four tensors (fc1.weight, fc1.bias, head.weight, head.bias)."""
        w1, b1, w2, b2 = params
        method = self.method
        if method.config.restart_each_task and index % self.flip_period == 0:
            method.t = 0  # on_task_start
        sigma = method.sigma()
        method.t += 1
        g_w1 = np.multiply.outer(dz, x)  # lr * gradient
        g_w2 = scale * h
        if sigma > 0:
            generator = method.noise.get(torch.device("cpu"))
            for buffer in self.buffers:
                torch.randn(buffer.shape, generator=generator, out=buffer)
            n_w1, n_b1, n_w2, n_b2 = self.arrays
            # lr * sigma * ||g||: the norms of the lr-scaled gradients divided by lr, times lr
            g_w1 += n_w1.reshape(g_w1.shape) * np.float32(sigma * float(np.linalg.norm(g_w1)))
            g_b1 = dz + n_b1 * np.float32(sigma * float(np.linalg.norm(dz)))
            g_w2 += n_w2 * np.float32(sigma * float(np.linalg.norm(g_w2)))
            g_b2 = scale + n_b2 * np.float32(sigma * abs(float(scale)))
        else:
            g_b1, g_b2 = dz, scale
        w1 -= g_w1
        b1 -= g_b1
        w2 -= g_w2
        b2 -= g_b2


class _PerturbSchedule:
    """``shrink_perturb`` with ``when="step"`` and init noise: every ``every``-th step ``p <- shrink p + sigma eps``."""

    def __init__(self, method: Mitigation, model: nn.Module):
        from lopkit.mitigations.perturbation import weight_layers

        self.method = method
        self.bounds = []
        for layer in weight_layers(model):
            bound = 1.0 / math.sqrt(int(layer.weight[0].numel()))
            self.bounds += [bound] * (2 if layer.bias is not None else 1)
        self.noise: np.ndarray | None = None
        self.slices: list[tuple[int, int, tuple[int, ...]]] = []
        self.position = 0

    def begin(self, params: tuple[np.ndarray, ...], length: int) -> None:
        """Draw the noise of the block's applications at once (uniform draws equal the per-step ones)."""
        method = self.method
        every = method.config.every
        self.events = method.events
        applications = (self.events + length) // every - self.events // every
        sizes = [p.size for p in params]
        self.slices = [(a, b, p.shape) for a, b, p in zip(np.cumsum([0] + sizes)[:-1], np.cumsum(sizes), params)]
        self.position = 0
        self.noise = None
        if applications and method.sigma != 0.0:
            generator = method.noise.get(torch.device("cpu"))
            draws = torch.rand((applications, sum(sizes)), generator=generator).numpy()
            bounds = np.concatenate([np.full(n, bound, dtype=np.float32) for n, bound in zip(sizes, self.bounds)])
            # (u * 2 - 1) * bound in float32 as init_noise, times sigma as the update's alpha
            self.noise = (draws * np.float32(2.0) - np.float32(1.0)) * bounds * np.float32(method.sigma)

    def step(self, params: tuple[np.ndarray, ...]) -> None:
        """Count one step; on every ``every``-th, shrink and perturb all four tensors."""
        method = self.method
        self.events += 1
        if self.events % method.config.every:
            return
        shrink = np.float32(method.shrink)
        row = self.noise[self.position] if self.noise is not None else None
        for p, (a, b, shape) in zip(params, self.slices):
            if method.shrink != 1.0:
                p *= shrink
            if row is not None:
                p += row[a:b].reshape(shape)
        self.position += 1
        method.applications += 1

    def finish(self) -> None:
        """Write the event counter back to the method."""
        self.method.events = self.events


class LeanKernel:
    """A method inside the lean engine: ``run_block`` trains a block of steps with the method's effect."""

    def periods(self) -> tuple[int, ...]:
        """Step periods at which blocks must end (e.g. a periodic method's check)."""
        return ()

    def run_block(self, views: tuple[np.ndarray, ...], inputs: np.ndarray, targets: np.ndarray, lr: float,
                  loss_sum: float, first_step: int) -> float:
        """Train ``len(inputs)`` steps from ``first_step``; returns the updated loss sum."""
        raise NotImplementedError


class _CBPKernel(LeanKernel):
    def __init__(self, method: Mitigation, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.cbp = LeanCBP([method], [model], [optimizer])

    def run_block(self, views, inputs, targets, lr, loss_sum, first_step):
        return lean_cbp_block(views, inputs, targets, lr, loss_sum, first_step, self.cbp)


class _MethodKernel(LeanKernel):
    """``l2``, ``l2init``, ``noisy_sgd``, ``shrink_perturb`` and ``redo`` through :func:`lean_method_block`."""

    def __init__(self, method: Mitigation, model: nn.Module, optimizer: torch.optim.Optimizer, flip_period: int,
                 block_size: int):
        from lopkit.mitigations.perturbation import NoisySGD, ShrinkPerturb
        from lopkit.mitigations.regularizers import L2, L2Init
        from lopkit.mitigations.resets import ReDo

        self.method, self.model, self.optimizer, self.flip_period = method, model, optimizer, flip_period
        self.penalty = self.noise = self.perturb = self.record = None
        self.task_hook = False
        kind = type(method)
        if kind in (L2, L2Init) and method.config.strength != 0:
            ids = {id(p): n for n, p in enumerate(_tensors(model))}
            named = method._selection.named(model)
            anchors = method._anchor_list(model, named) if kind is L2Init else [None] * len(named)
            self.penalty = (2.0 * method.config.strength, [
                (ids[id(p)], None if a is None else a.detach().numpy().reshape(-1 if ids[id(p)] == 2 else a.shape))
                for (_, p), a in zip(named, anchors)
            ])
        elif kind is NoisySGD:
            self.noise = _GradientNoise(method, model, flip_period)
        elif kind is ShrinkPerturb:
            if method.config.when == "step":
                self.perturb = _PerturbSchedule(method, model)
            else:
                self.task_hook = True
        elif kind is ReDo:
            self.record = np.zeros((block_size, learner_layers(model)[0].weight.shape[0]), dtype=np.float32)

    def periods(self) -> tuple[int, ...]:
        """Task starts (``shrink_perturb`` per task) and ReDo's checks end blocks."""
        if self.task_hook:
            return (self.flip_period,)
        if self.record is not None:
            return (self.method.config.every,)
        return ()

    def run_block(self, views, inputs, targets, lr, loss_sum, first_step):
        method = self.method
        if self.task_hook and first_step % self.flip_period == 0:
            method.on_task_start(self.model, self.optimizer, first_step // self.flip_period)
        penalty = None if self.penalty is None else (self.penalty[0] * lr, self.penalty[1])
        if self.perturb is not None:
            self.perturb.begin(views, len(inputs))
        loss_sum = lean_method_block(views, inputs, targets, lr, loss_sum, first_step, penalty=penalty,
                                     noise=self.noise, perturb=self.perturb, record=self.record)
        if self.perturb is not None:
            self.perturb.finish()
        if self.record is not None:
            self._redo_statistics(first_step, len(inputs))
        return loss_sum

    def _redo_statistics(self, first_step: int, length: int) -> None:
        """Add the block's window rows to ReDo's sums; run its check when the block ends on a check step."""
        method = self.method
        every, window = method.config.every, method.config.window_steps
        steps = np.arange(first_step, first_step + length)
        rows = self.record[:length][(steps % every >= every - window) if window else slice(None)]
        if len(rows):
            state = method.stats[0]
            h = torch.from_numpy(rows.astype(np.float64))
            state["sum_abs"] += h.abs().sum(dim=0)
            state["sum"] += h.sum(dim=0)
            state["count"] += len(rows)
        end = first_step + length
        if end % every == 0:
            method.after_step(self.model, self.optimizer, end - 1)
        else:
            method._set_capture_for(end)


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    """The learner's (W1, b1, W2, b2) parameters in the order of :func:`lean_param_views`."""
    hidden, _activation, output = learner_layers(model)
    return [hidden.weight, hidden.bias, output.weight, output.bias]


def _method_kernel_supported(method: Mitigation, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether :class:`_MethodKernel` reproduces ``method`` (exact types, plain learner, plain SGD)."""
    from lopkit.mitigations.perturbation import NoisySGD, ShrinkPerturb
    from lopkit.mitigations.regularizers import L2, L2Init
    from lopkit.mitigations.resets import ReDo

    kind = type(method)
    if kind in (L2, L2Init):
        return True
    if kind is NoisySGD:
        return list(model.parameters()) == _tensors(model)
    if kind is ShrinkPerturb:
        return method.config.when == "task" or method.config.noise == "init"
    if kind is ReDo:
        groups = method.groups
        hidden, _activation, output = learner_layers(model)
        return (len(groups) == 1 and groups[0].incoming is hidden and method.capture is not None
                and method.capture_post_activation and not method.capture_pre_activation)
    return False


def has_lean_kernel_type(method: Mitigation) -> bool:
    """Whether ``method`` is of a type with a lean kernel (before it is attached; see :func:`has_lean_kernel`)."""
    from lopkit.mitigations.perturbation import NoisySGD, ShrinkPerturb
    from lopkit.mitigations.regularizers import L2, L2Init
    from lopkit.mitigations.resets import AggressiveContinualBackprop, ContinualBackprop, ReDo

    kinds = (ContinualBackprop, AggressiveContinualBackprop, ReDo, L2, L2Init, ShrinkPerturb, NoisySGD)
    return type(_single(method)) in kinds


def has_lean_kernel(method: Mitigation, model: nn.Module) -> bool:
    """Whether :func:`lean_kernel` has a kernel for ``method`` (attached) on ``model``."""
    if lean_cbp_supported(method, model):
        return True
    single = _single(method)
    try:
        learner_layers(model)
    except ValueError:
        return False
    return single is not None and _method_kernel_supported(single, model, None)


def lean_kernel(
    method: Mitigation, model: nn.Module, optimizer: torch.optim.Optimizer, config: Any = None
) -> LeanKernel | None:
    """The lean kernel that runs ``method`` on the bit-flipping learner, or None when there is none.

    ``config`` (the benchmark's) gives the flip period (task starts) and the block size.
    """
    if lean_cbp_supported(method, model):
        return _CBPKernel(method, model, optimizer)
    single = _single(method)
    if single is None or config is None:
        return None
    try:
        learner_layers(model)
    except ValueError:
        return None
    if _method_kernel_supported(single, model, optimizer):
        return _MethodKernel(single, model, optimizer, config.flip_period, config.block_size)
    return None
