"""Unit-reset mitigations: continual backprop (CBP), ReDo, frozen-unit reset and cloned-unit perturbation.

All four act on the *unit groups* of a network (see :mod:`lopkit.mitigations.layers`): forward hooks
installed by ``attach`` collect per-unit statistics of the training batches, and ``after_step`` (called
after ``optimizer.step()``) decides which units to touch.

- ``cbp`` (Dohare et al. 2021/2024, as his ``gnt.py``): every step, a running *utility* per unit; on average
  a fraction ``replacement_rate`` of the mature units with the lowest utility is re-initialised.
  ``cbp_aggressive``: CBP as the paper's (Barriers) bit-flipping script does it,
  ``max(1, floor(units * replacement_rate))`` mature units every step (``docs/methods/cbp.md``).
- ``redo`` (Sokar et al. 2023): every ``every`` steps, re-initialise the tau-dormant units.
- ``reset_frozen`` (the paper's frozen-unit manifold, Theorem 2.1): every ``every`` steps, re-initialise units
  whose activation derivative is below ``eps`` on at least ``sample_fraction`` of recent samples.
- ``break_clones`` (the paper's cloned-unit manifold): every ``every`` steps, find clusters of duplicate units
  and add small Gaussian noise to the incoming weights of all but one unit of each cluster.

A reset re-draws the unit's incoming weights (bias zero), zeroes its outgoing weights (so the network's
function does not jump), resets its per-unit norm parameters and zeroes its optimizer state.

Each method owns a ``torch.Generator`` seeded at ``attach`` with :meth:`Mitigation.method_seed` (derived from
``config.seed`` if set, else from the run's seed, so it is the same in every process); its state, the
statistics and the counters are in ``state_dict()``, so a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, Sequence

import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from torch import nn

from lopkit.configs import require
from lopkit.diagnostics.activations import dormant_unit_mask
from lopkit.diagnostics.errors import LopkitWarning
from lopkit.diagnostics.units import activation_derivative
from lopkit.mitigations.base import Mitigation
from lopkit.mitigations.distributed import ddp_process_group, mean_over_ranks, sum_over_ranks
from lopkit.mitigations.layers import (
    BIAS_SCHEMES,
    INIT_SCHEMES,
    UnitCapture,
    UnitGroup,
    absorb_into_outgoing_bias,
    add_incoming_noise,
    outgoing_weight_magnitude,
    reinit_incoming,
    reset_optimizer_state,
    reset_units,
    resolve_unit_groups,
    zero_outgoing,
)
from lopkit.mitigations.registry import register_method

__all__ = [
    "UnitMethod",
    "CBPConfig",
    "ContinualBackprop",
    "AggressiveContinualBackprop",
    "AggressiveCBPConfig",
    "PeriodicConfig",
    "ReDoConfig",
    "ReDo",
    "ResetFrozenConfig",
    "ResetFrozen",
    "BreakClonesConfig",
    "BreakClones",
    "clusters_from_gram",
]

GroupsSpec = Sequence[UnitGroup] | Callable[[nn.Module], Sequence[UnitGroup]] | None


# --------------------------------------------------------------------------- shared machinery


def _check_init(init: str, bias_init: str) -> None:
    require(init in INIT_SCHEMES, f"init must be one of {', '.join(INIT_SCHEMES)}, got {init!r}")
    require(bias_init in BIAS_SCHEMES, f"bias_init must be one of {', '.join(BIAS_SCHEMES)}, got {bias_init!r}")


def _check_seed(seed: int | None) -> None:
    require(
        seed is None or (isinstance(seed, int) and seed >= 0), f"seed must be a non-negative int or None, got {seed!r}"
    )


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().cpu().clone()


class UnitMethod(Mitigation):
    """Base class: resolves unit groups at ``attach``, owns a generator, hooks and per-group statistics.

    ``groups`` (constructor keyword) overrides automatic discovery: a list of :class:`UnitGroup` or a
    callable ``model -> list[UnitGroup]`` (use the callable when another mitigation's ``prepare_model`` may
    rebuild the model). Subclasses implement ``_new_group_state``, ``_on_activation`` and ``after_step``.

    Under ``DistributedDataParallel`` (the model given to ``attach`` is one, over more than one rank) the
    statistics a decision reads are combined over the ranks first (:mod:`lopkit.mitigations.distributed`), so
    every rank resets the same units, as one process would on the global batch, and the replicas stay identical.
    """

    name = "unit_method"
    capture_post_activation = True
    capture_pre_activation = False

    def __init__(self, config: Any = None, groups: GroupsSpec = None):
        self.config = config if config is not None else self.Config()  # type: ignore[attr-defined]
        self.config.validate()
        self._groups_spec = groups
        self.groups: list[UnitGroup] = []
        self.generator: torch.Generator | None = None
        self.capture: UnitCapture | None = None
        self.stats: list[dict[str, Any]] = []
        self.replaced_per_group: list[int] = []
        self.total_replaced = 0
        self.events = 0
        self._pending_state: dict | None = None
        self._rank_group: Any = None

    # ----------------------------------------------------------------- hooks of the protocol

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Find the unit groups, seed the generator, build statistics and install forward hooks."""
        self.detach()
        self._rank_group = ddp_process_group(model)  # None unless DDP over several ranks
        self.groups = resolve_unit_groups(model, self._groups_spec)
        self.generator = torch.Generator()
        self.generator.manual_seed(self.method_seed(self.config.seed))
        self.stats = [self._new_group_state(group) for group in self.groups]
        self.replaced_per_group = [0] * len(self.groups)
        self.total_replaced = 0
        self.events = 0
        self.capture = UnitCapture(
            self.groups, self._on_activation,
            post_activation=self.capture_post_activation, pre_activation=self.capture_pre_activation,
        ).attach()  # fmt: skip
        self._after_attach()
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)

    def detach(self) -> None:
        """Remove the forward hooks (the method then stops collecting statistics)."""
        if self.capture is not None:
            self.capture.remove()
            self.capture = None

    def _after_attach(self) -> None:
        """Subclass hook run at the end of ``attach``."""

    def _new_group_state(self, group: UnitGroup) -> dict[str, Any]:
        raise NotImplementedError

    def _on_activation(self, index: int, kind: str, m: torch.Tensor) -> None:
        raise NotImplementedError

    def _require_attached(self) -> None:
        if self.capture is None:
            raise RuntimeError(f"{self.name}: call method.attach(model, optimizer) before training")

    # ----------------------------------------------------------------- the reset itself

    def _reset_units(
        self,
        index: int,
        mask: torch.Tensor,
        optimizer: torch.optim.Optimizer | None,
        unit_means: torch.Tensor | None = None,
    ) -> int:
        """Re-initialise the masked units of group ``index`` (incoming, outgoing, norm, optimizer state)."""
        count = reset_units(self.groups[index], mask, optimizer, generator=self.generator, init=self.config.init,
                            bias=self.config.bias_init, unit_means=unit_means,
                            reset_optimizer=self.config.reset_optimizer)
        if count == 0:
            return 0
        self.replaced_per_group[index] += count
        self.total_replaced += count
        return count

    # ----------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """Generator state, per-group statistics (CPU tensors) and counters."""
        if self.generator is None:
            return {}
        return {
            "generator": self.generator.get_state(),
            "stats": [{k: _cpu(v) if isinstance(v, torch.Tensor) else v for k, v in s.items()} for s in self.stats],
            "replaced_per_group": list(self.replaced_per_group),
            "total_replaced": self.total_replaced,
            "events": self.events,
            "extra": self._extra_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``; before ``attach`` the state is kept and applied when attaching."""
        if not state:
            return
        if self.generator is None:
            self._pending_state = state
            return
        if len(state["stats"]) != len(self.stats):
            raise ValueError(
                f"{self.name}: saved state has {len(state['stats'])} unit groups, the model has {len(self.stats)}"
            )
        self.generator.set_state(state["generator"])
        for current, saved in zip(self.stats, state["stats"]):
            for key, value in saved.items():
                old = current.get(key)
                if isinstance(old, torch.Tensor):
                    current[key] = value.to(device=old.device, dtype=old.dtype).clone()
                else:
                    current[key] = value
        self.replaced_per_group = list(state["replaced_per_group"])
        self.total_replaced = int(state["total_replaced"])
        self.events = int(state["events"])
        self._load_extra_state(state.get("extra", {}))

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, extra: dict) -> None:
        """Restore what ``_extra_state`` returned."""


def _device_of(group: UnitGroup) -> torch.device:
    return group.incoming.weight.device


# --------------------------------------------------------------------------- continual backprop


@dataclasses.dataclass
class CBPConfig:
    """``cbp`` hyper-parameters; defaults follow Dohare et al.'s ``gnt.py`` as his bit-flipping script runs it."""

    replacement_rate: float = 1e-4
    """rho: expected replacements per mature unit and step."""
    maturity: int = 10
    """Units with age > maturity are eligible (10: what Dohare's bit-flipping script effectively uses)."""
    decay_rate: float = 0.99
    """eta of the running averages."""
    utility_type: str = "adaptable_contribution"
    """``adaptable_contribution`` (his bit-flipping runs) or ``contribution``."""
    bias_correction: bool = False
    """Add the replaced unit's bias-corrected mean contribution to the next layer's bias. False for ``cbp``:
    Dohare's ``gen_new_features`` adds the running mean *after* ``test_features`` zeroed it, i.e. adds 0."""
    schedule: str = "coin"
    """How many units per step: ``coin`` (his default, ``accumulate=False``: floor(rate * eligible), and when
    that is below 1 one unit with probability rate * eligible) or ``accumulate`` (his ``accumulate=True``:
    replace the integer part of the running sum of rate * eligible, keep the remainder)."""
    weight_magnitude: str = "mean"
    """``mean`` (his: mean |w| over the outgoing and over the incoming weights) or ``sum`` (the Barriers
    script's sums). Both rank units the same; only the utility's scale differs."""
    constant_column: bool | None = None
    """The first layer's last input column is a constant 1 (the paper's bit-flipping learner). True: treat its
    weight as the unit's bias, as Dohare (whose learner has no such column) treats the bias: left out of
    |w_in|, set to 0 on replacement. None: the benchmark decides (bit-flipping: its ``constant_input``)."""
    init: str = "kaiming_uniform"
    """Incoming weights of a replaced unit."""
    bias_init: str = "zero"
    """Bias of a replaced unit."""
    reset_optimizer: bool = True
    """Zero the optimizer state of the replaced units' weights."""
    seed: int | None = None
    """Seed of the method's generator (init draws, coin flips); None follows the run's seed."""

    SCHEDULES = ("coin", "accumulate")
    MAGNITUDES = ("mean", "sum")

    def validate(self) -> None:
        """Raise ConfigError for impossible values."""
        require(0.0 <= self.replacement_rate <= 1.0, f"replacement_rate must be in [0, 1], got {self.replacement_rate}")
        require(self.maturity >= 0, f"maturity must be >= 0, got {self.maturity}")
        require(0.0 <= self.decay_rate < 1.0, f"decay_rate must be in [0, 1), got {self.decay_rate}")
        require(
            self.utility_type in ContinualBackprop.UTILITY_TYPES,
            f"utility_type must be one of {', '.join(ContinualBackprop.UTILITY_TYPES)}, got {self.utility_type!r}",
        )
        require(self.schedule in self.SCHEDULES, f"schedule must be one of {', '.join(self.SCHEDULES)}, got {self.schedule!r}")
        require(
            self.weight_magnitude in self.MAGNITUDES,
            f"weight_magnitude must be one of {', '.join(self.MAGNITUDES)}, got {self.weight_magnitude!r}",
        )
        _check_init(self.init, self.bias_init)
        _check_seed(self.seed)


@register_method
class ContinualBackprop(UnitMethod):
    """Continual backprop as Dohare et al.'s ``gnt.py`` does it (``docs/methods/cbp.md``).

    After every optimizer step, per unit: age a += 1, running mean m <- eta m + (1-eta) mean(h) of its
    activation on the step's training batch, and utility u <- eta u + (1-eta) y with

    - ``contribution``:           mean_batch |h| * |w_out|
    - ``adaptable_contribution``: mean_batch |h - hbar| * |w_out| / |w_in|

    where hbar = m / (1 - eta^a), |w| is the mean (``weight_magnitude="mean"``, his) or sum of absolute weights
    (the first layer's bias, and a ``constant_column``, left out) and units are ranked by u / (1 - eta^a).
    Units with age > ``maturity`` are eligible; the number replaced follows ``schedule``; the lowest-utility
    ones get fresh incoming weights (``init``, bias 0, a constant column's weight 0) and zero outgoing weights
    (with ``bias_correction`` their mean contribution first goes to the next layer's bias), and their age,
    utility and mean restart at 0.
    """

    name = "cbp"
    Config = CBPConfig
    UTILITY_TYPES = ("contribution", "adaptable_contribution")

    def _new_group_state(self, group: UnitGroup) -> dict[str, Any]:
        units, device = group.num_units, _device_of(group)
        return {
            "utility": torch.zeros(units, dtype=torch.float64, device=device),
            "mean_activation": torch.zeros(units, dtype=torch.float64, device=device),
            "age": torch.zeros(units, dtype=torch.long, device=device),
            "accumulated": 0.0,
        }

    def _after_attach(self) -> None:
        self._batch: list[dict[str, torch.Tensor] | None] = [None] * len(self.groups)
        self._warned_missing = False

    def _constant_column(self, index: int) -> bool:
        """Whether group ``index``'s incoming layer has a constant last input column (first group only)."""
        return bool(getattr(self.config, "constant_column", None)) and index == 0 and not self.groups[0].is_conv

    @torch.no_grad()
    def _on_activation(self, index: int, kind: str, m: torch.Tensor) -> None:
        """Reduce the training batch to the per-unit means the utility needs (nothing else is kept)."""
        state, eta = self.stats[index], self.config.decay_rate
        h = m.double()
        batch_mean = h.mean(dim=0)
        if self.config.utility_type == "contribution":
            deviation = h.abs().mean(dim=0)
        else:  # |h - hbar| with hbar the bias-corrected running mean *including* this batch (as Dohare et al.)
            correction = 1.0 - eta ** (state["age"] + 1).double()
            mean_h = (eta * state["mean_activation"] + (1.0 - eta) * batch_mean) / correction
            deviation = (h - mean_h).abs().mean(dim=0)
        self._batch[index] = {"mean": batch_mean, "deviation": deviation}

    def num_to_replace(self, index: int, eligible: int) -> int:
        """Units to replace this step given ``eligible`` mature ones (``schedule``: coin flip or accumulate)."""
        if eligible == 0 or self.config.replacement_rate == 0:
            return 0
        expected = self.config.replacement_rate * eligible
        if self.config.schedule == "accumulate":
            state = self.stats[index]
            state["accumulated"] += expected
            count = int(math.floor(state["accumulated"]))
            state["accumulated"] -= count
            return min(count, eligible)
        if expected < 1.0:
            draw = float(torch.rand(1, generator=self.generator, dtype=torch.float64))
            return 1 if draw <= expected else 0
        return min(int(expected), eligible)

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Update ages and utilities from the step's training batch, then replace units."""
        self._require_attached()
        for index, group in enumerate(self.groups):
            batch = self._batch[index]
            self._batch[index] = None
            if batch is None:
                self._warn_missing(group)
                continue
            if self._rank_group is not None:  # DDP: the global batch's means (equal per-rank batch sizes)
                batch = {key: mean_over_ranks(value, self._rank_group) for key, value in batch.items()}
            self._update_utility(index, group, batch)
            self._replace(index, group, optimizer)

    def _warn_missing(self, group: UnitGroup) -> None:
        if not self._warned_missing:
            warnings.warn(
                f"{self.name}: no training-mode forward of {group.name!r} since the last step, so its utilities "
                "were not updated; call model.train() and run the forward pass before after_step",
                LopkitWarning,
                stacklevel=3,
            )
            self._warned_missing = True

    def weight_magnitudes(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per unit (|w_out|, |w_in|) as the utility uses them (mean or sum; bias and constant column excluded)."""
        group = self.groups[index]
        out_sum = outgoing_weight_magnitude(group).double()
        weight = group.incoming.weight.detach()
        rows = weight.reshape(weight.shape[0], -1)
        if self._constant_column(index):
            rows = rows[:, :-1]
        in_sum = rows.abs().sum(dim=1).double()
        if self.config.weight_magnitude == "sum":
            return out_sum, in_sum
        out_count = group.outgoing.weight.numel() // group.num_units if group.outgoing is not None else 1
        return out_sum / max(out_count, 1), in_sum / rows.shape[1]

    @torch.no_grad()
    def _update_utility(self, index: int, group: UnitGroup, batch: dict[str, torch.Tensor]) -> None:
        """Age += 1, running mean and utility updates with the post-step outgoing (and incoming) weights."""
        state, eta = self.stats[index], self.config.decay_rate
        state["age"] += 1
        state["mean_activation"].mul_(eta).add_(batch["mean"], alpha=1.0 - eta)
        out_mag, in_mag = self.weight_magnitudes(index)
        instant = batch["deviation"] * out_mag
        if self.config.utility_type == "adaptable_contribution":
            instant /= in_mag + self._in_epsilon
        state["utility"].mul_(eta).add_(instant, alpha=1.0 - eta)

    _in_epsilon = 1e-12  # guards |w_in| = 0 (Dohare: none; the Barriers script: 1e-10)

    def corrected_utility(self, index: int) -> torch.Tensor:
        """Bias-corrected utility u / (1 - eta^age) of group ``index`` (units of age 0 get 0)."""
        state = self.stats[index]
        correction = 1.0 - self.config.decay_rate ** state["age"].double()
        return torch.where(
            correction > 0, state["utility"] / correction.clamp_min(1e-300), torch.zeros_like(correction)
        )

    def mean_activation(self, index: int) -> torch.Tensor:
        """Bias-corrected running mean of each unit's activation (0 for units of age 0)."""
        state = self.stats[index]
        correction = 1.0 - self.config.decay_rate ** state["age"].double()
        return torch.where(
            correction > 0, state["mean_activation"] / correction.clamp_min(1e-300), torch.zeros_like(correction)
        )

    def choose(self, index: int, count: int) -> torch.Tensor:
        """The ``count`` eligible units of group ``index`` with the lowest corrected utility (ties: lower index)."""
        state = self.stats[index]
        eligible = (state["age"] > self.config.maturity).nonzero().flatten()
        utility = self.corrected_utility(index)[eligible]
        order = torch.argsort(utility.cpu(), stable=True)
        return eligible.cpu()[order[:count]]

    def _units_to_replace(self, index: int, group: UnitGroup) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(chosen indices, boolean mask)`` of this step's replacements in group ``index``; None when none."""
        mature = self.stats[index]["age"] > self.config.maturity
        count = self.num_to_replace(index, int(mature.sum()))
        if count == 0:
            return None
        chosen = self.choose(index, count)
        mask = torch.zeros(group.num_units, dtype=torch.bool)
        mask[chosen] = True
        return chosen, mask

    def _forget_units(self, index: int, mask: torch.Tensor) -> None:
        """Replaced units start afresh: utility, running mean and age back to 0; one more replacement event."""
        state = self.stats[index]
        device_mask = mask.to(state["age"].device)
        state["utility"][device_mask] = 0.0
        state["mean_activation"][device_mask] = 0.0
        state["age"][device_mask] = 0
        self.events += 1

    @torch.no_grad()
    def _replace(self, index: int, group: UnitGroup, optimizer: torch.optim.Optimizer) -> None:
        picked = self._units_to_replace(index, group)
        if picked is None:
            return
        _, mask = picked
        means = self.mean_activation(index) if self.config.bias_correction else None
        self._reset_units(index, mask, optimizer, unit_means=means)
        if self._constant_column(index):
            group.incoming.weight[mask.to(group.incoming.weight.device), -1] = 0.0
        self._forget_units(index, mask)


@dataclasses.dataclass
class AggressiveCBPConfig(CBPConfig):
    """``cbp_aggressive`` hyper-parameters; defaults follow the paper's (Barriers) bit-flipping script."""

    maturity: int = 100
    """Units with age > maturity are eligible (the script's ``maturity_threshold``)."""
    bias_correction: bool = True
    """Add the replaced units' bias-corrected mean contribution to the next layer's bias (the script does)."""
    weight_magnitude: str = "sum"
    """The script sums |w_out| and |w_in| (all fc1 input columns, the constant one included)."""
    constant_column: bool | None = False
    """The script treats the constant column as an ordinary input."""
    redraw_incoming: bool = False
    """Redraw the replaced units' incoming weights. False, as the script *does*: its Kaiming-uniform redraw
    writes into ``fc1.weight[units]``, an advanced-indexing copy, so fc1's rows keep their weights."""
    zero_layer_bias: bool = True
    """At each replacement zero the *whole* bias of the first layer, as the script does."""


@register_method
class AggressiveContinualBackprop(ContinualBackprop):
    """CBP as the paper's (Barriers) bit-flipping script does it (``docs/methods/cbp.md``, section cbp_aggressive).

    Same utility as ``cbp`` (summed magnitudes); once any unit is mature, ``min(eligible, max(1,
    floor(units * rate)))`` lowest-utility mature units are replaced *every step*. A replacement adds the
    units' mean contribution to the next layer's bias, zeroes their outgoing weights and zeroes the whole
    first-layer bias; their incoming weights are kept (``redraw_incoming=False``, what the script's code does).
    Differences left: the script measures h with a second forward after the update and starts at step 1.
    """

    name = "cbp_aggressive"
    Config = AggressiveCBPConfig
    _in_epsilon = 1e-10  # the script adds 1e-10 to sum |w_in|

    def num_to_replace(self, index: int, eligible: int) -> int:
        """``min(eligible, max(1, floor(units * rate)))`` when any unit is mature (and the rate is > 0)."""
        if eligible == 0 or self.config.replacement_rate == 0:
            return 0
        units = self.groups[index].num_units
        return min(eligible, max(1, int(math.floor(units * self.config.replacement_rate))))

    @torch.no_grad()
    def _replace(self, index: int, group: UnitGroup, optimizer: torch.optim.Optimizer) -> None:
        picked = self._units_to_replace(index, group)
        if picked is None:
            return
        chosen, mask = picked
        count = len(chosen)
        if self.config.redraw_incoming:
            reinit_incoming(group, mask, self.generator, init=self.config.init, bias=self.config.bias_init)
        if self.config.zero_layer_bias and index == 0 and group.incoming.bias is not None:
            group.incoming.bias.zero_()
        out = group.outgoing
        if isinstance(out, nn.Linear) and group.outgoing_block == 1 and not group.is_conv:  # fast path, same result
            columns = chosen.to(out.weight.device)
            if self.config.bias_correction and out.bias is not None:
                means = self.mean_activation(index)[chosen].to(device=out.weight.device, dtype=out.weight.dtype)
                out.bias.add_(out.weight[:, columns] @ means)
            out.weight[:, columns] = 0.0
        else:
            if self.config.bias_correction:
                absorb_into_outgoing_bias(group, mask, self.mean_activation(index))
            zero_outgoing(group, mask)
        if self.config.reset_optimizer and optimizer is not None and len(optimizer.state) > 0:
            reset_optimizer_state(optimizer, group, mask)
        self.replaced_per_group[index] += count
        self.total_replaced += count
        self._forget_units(index, mask)


# --------------------------------------------------------------------------- periodic methods


@dataclasses.dataclass
class PeriodicConfig:
    """Shared hyper-parameters of the periodic methods (check every ``every`` steps on the last ``window_steps``)."""

    every: int = 1000
    window_steps: int = 100
    init: str = "default"
    bias_init: str = "zero"
    reset_optimizer: bool = True
    seed: int | None = None

    def validate(self) -> None:
        """Raise ConfigError for impossible values."""
        require(self.every >= 1, f"every must be a positive number of steps, got {self.every}")
        require(
            0 <= self.window_steps,
            f"window_steps must be >= 0 (0 = every step since the previous check), got {self.window_steps}",
        )
        _check_init(self.init, self.bias_init)
        _check_seed(self.seed)


class PeriodicUnitMethod(UnitMethod):
    """Collects statistics over the last ``window_steps`` steps before each check; checks every ``every`` steps.

    Checks happen after the steps with 0-based index ``every - 1, 2 * every - 1, ...``. Statistics are
    gathered only during steps whose index ``s`` satisfies ``s % every >= every - window_steps``
    (``window_steps=0``: all steps since the previous check) and are cleared after each check. Every statistic
    is a sum over samples, so under DDP the ranks' sums are added before a check (the global batch's statistic).
    """

    def _after_attach(self) -> None:
        self._set_capture_for(0)

    def _in_window(self, step: int) -> bool:
        every, window = self.config.every, self.config.window_steps
        return window == 0 or step % every >= every - window

    def _set_capture_for(self, step: int) -> None:
        self._next_step = step
        if self.capture is not None:
            self.capture.enabled = self._in_window(step)

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Every ``every`` steps, act on the collected statistics and clear them."""
        self._require_attached()
        if (step + 1) % self.config.every == 0:
            self.check_now(optimizer)
        self._set_capture_for(step + 1)

    def check_now(self, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Act immediately on the statistics collected so far (then clear them); returns the units touched.

        Under DDP every rank must call it at the same step: the ranks' sums are added first.
        """
        self._require_attached()
        before = self.total_replaced
        for index, group in enumerate(self.groups):
            self.stats[index] = sum_over_ranks(self.stats[index], self._rank_group)  # DDP: the global batch's
            self._check(index, group, optimizer)
            self.stats[index] = self._new_group_state(group)
        return self.total_replaced - before

    def _check(self, index: int, group: UnitGroup, optimizer: torch.optim.Optimizer | None) -> None:
        raise NotImplementedError

    def _extra_state(self) -> dict:
        return {"next_step": self._next_step}

    def _load_extra_state(self, extra: dict) -> None:
        self._set_capture_for(int(extra.get("next_step", 0)))


# --------------------------------------------------------------------------- ReDo


@dataclasses.dataclass
class ReDoConfig(PeriodicConfig):
    """ReDo hyper-parameters: recycle tau-dormant units every ``every`` steps (Sokar et al. 2023)."""

    tau: float = 0.025
    absorb_mean: bool = False

    def validate(self) -> None:
        """Raise ConfigError for impossible values."""
        super().validate()
        require(self.tau >= 0.0, f"tau must be >= 0 (0 = only exactly silent units), got {self.tau}")


@register_method
class ReDo(PeriodicUnitMethod):
    """ReDo (Sokar et al. 2023): every ``every`` steps re-initialise the tau-dormant units.

    Score s_i = E|h_i| / mean_k E|h_k| over the samples of the last ``window_steps`` training steps
    (ReDo scores one mini-batch: ``window_steps=1``; the default 100 also works for batch-1 online learning);
    units with s_i <= ``tau`` get fresh incoming weights, zero outgoing weights and zeroed optimizer state.
    ``absorb_mean`` (not in ReDo) first adds the unit's mean contribution to the next layer's bias.
    """

    name = "redo"
    Config = ReDoConfig

    def _new_group_state(self, group: UnitGroup) -> dict[str, Any]:
        units, device = group.num_units, _device_of(group)
        return {
            "sum_abs": torch.zeros(units, dtype=torch.float64, device=device),
            "sum": torch.zeros(units, dtype=torch.float64, device=device),
            "count": 0,
        }

    def _on_activation(self, index: int, kind: str, m: torch.Tensor) -> None:
        state = self.stats[index]
        m = m.double()
        state["sum_abs"] += m.abs().sum(dim=0)
        state["sum"] += m.sum(dim=0)
        state["count"] += m.shape[0]

    def dormant_mask(self, index: int) -> torch.Tensor:
        """tau-dormant units of group ``index`` on the statistics collected so far (all False without data)."""
        state = self.stats[index]
        if state["count"] == 0:
            return torch.zeros(self.groups[index].num_units, dtype=torch.bool)
        mean_abs = (state["sum_abs"] / state["count"]).unsqueeze(0)  # a 1-row matrix has E|h| as its |h|
        return dormant_unit_mask(mean_abs, self.config.tau).cpu()

    def _check(self, index: int, group: UnitGroup, optimizer: torch.optim.Optimizer | None) -> None:
        mask = self.dormant_mask(index)
        if not bool(mask.any()):
            return
        state = self.stats[index]
        means = state["sum"] / state["count"] if self.config.absorb_mean else None
        self._reset_units(index, mask, optimizer, unit_means=means)
        self.events += 1


# --------------------------------------------------------------------------- frozen units


@dataclasses.dataclass
class ResetFrozenConfig(PeriodicConfig):
    """Frozen-unit reset hyper-parameters (spec 6 item 4 / 8.8: |f'(z)| < 0.01 on >= 99 % of samples)."""

    eps: float = 0.01
    sample_fraction: float = 0.99
    absorb_mean: bool = True

    def validate(self) -> None:
        """Raise ConfigError for impossible values."""
        super().validate()
        require(self.eps > 0.0, f"eps must be > 0, got {self.eps}")
        require(0.0 < self.sample_fraction <= 1.0, f"sample_fraction must be in (0, 1], got {self.sample_fraction}")


@register_method
class ResetFrozen(PeriodicUnitMethod):
    """Targeted escape from the frozen-unit manifold: re-initialise units with f'(z) ~ 0 on recent samples.

    A unit is frozen when |f'(z)| < ``eps`` on at least ``sample_fraction`` of the samples of the last
    ``window_steps`` training steps (dead ReLU: z < 0; saturated tanh/sigmoid: |z| large). Its incoming
    weights are re-drawn and its outgoing weights zeroed; with ``absorb_mean`` its mean activation times its
    outgoing weights is first added to the next layer's bias, so the network function is unchanged at the
    reset when the unit's activation was constant (exactly for dead ReLUs; up to the tiny variance of a
    saturated tanh). Groups without an activation module (linear units) are never frozen.
    """

    name = "reset_frozen"
    Config = ResetFrozenConfig
    capture_pre_activation = True

    def _new_group_state(self, group: UnitGroup) -> dict[str, Any]:
        units, device = group.num_units, _device_of(group)
        return {
            "frozen_count": torch.zeros(units, dtype=torch.float64, device=device),
            "sum": torch.zeros(units, dtype=torch.float64, device=device),
            "count": 0,
            "count_h": 0,
        }

    def _on_activation(self, index: int, kind: str, m: torch.Tensor) -> None:
        state, group = self.stats[index], self.groups[index]
        if kind == "h":
            state["sum"] += m.double().sum(dim=0)
            state["count_h"] += m.shape[0]
        elif group.activation is not None:
            derivative = activation_derivative(m, group.activation)
            state["frozen_count"] += (derivative.abs() < self.config.eps).double().sum(dim=0)
            state["count"] += m.shape[0]

    def frozen_mask(self, index: int) -> torch.Tensor:
        """Frozen units of group ``index`` on the statistics collected so far (all False without data)."""
        state = self.stats[index]
        if state["count"] == 0:
            return torch.zeros(self.groups[index].num_units, dtype=torch.bool)
        return (state["frozen_count"] / state["count"] >= self.config.sample_fraction).cpu()

    def _check(self, index: int, group: UnitGroup, optimizer: torch.optim.Optimizer | None) -> None:
        mask = self.frozen_mask(index)
        if not bool(mask.any()):
            return
        state = self.stats[index]
        means = None
        if self.config.absorb_mean and state["count_h"] > 0:
            means = state["sum"] / state["count_h"]
        self._reset_units(index, mask, optimizer, unit_means=means)
        self.events += 1


# --------------------------------------------------------------------------- cloned units


@dataclasses.dataclass
class BreakClonesConfig(PeriodicConfig):
    """Cloned-unit perturbation hyper-parameters (duplicate rule of spec 6 item 2)."""

    threshold: float = 0.95
    noise_scale: float = 0.1
    keep_one: bool = True
    centered: bool = False
    absolute: bool = False
    include_bias: bool = False
    reset_optimizer: bool = False

    def validate(self) -> None:
        """Raise ConfigError for impossible values."""
        super().validate()
        require(-1.0 <= self.threshold < 1.0, f"threshold must be in [-1, 1), got {self.threshold}")
        require(self.noise_scale > 0.0, f"noise_scale must be > 0, got {self.noise_scale}")


_DEGENERATE_RATIO = (100 * torch.finfo(torch.float32).eps) ** 2  # same rule as diagnostics' unit columns


def clusters_from_gram(
    gram: torch.Tensor, threshold: float, *, raw_diagonal: torch.Tensor | None = None, absolute: bool = False
) -> list[list[int]]:
    """Duplicate clusters (as :func:`lopkit.diagnostics.similarity.duplicate_clusters`) from a Gram matrix H^T H.

    Cosine similarity is G_ij / sqrt(G_ii G_jj). Units with zero norm (or, for a centred Gram, whose centred
    norm is rounding noise relative to ``raw_diagonal``) have no direction and join no cluster. Clusters are
    sorted lists, largest first, ties by smallest index.
    """
    gram = gram.detach().double().cpu()
    diagonal = torch.diagonal(gram).clamp_min(0.0)
    reference = diagonal if raw_diagonal is None else raw_diagonal.detach().double().cpu()
    degenerate = (diagonal <= _DEGENERATE_RATIO * reference) | (diagonal == 0)
    norms = torch.where(degenerate, torch.ones_like(diagonal), diagonal.sqrt())
    similarity = gram / norms[:, None] / norms[None, :]
    if absolute:
        similarity = similarity.abs()
    adjacency = (similarity > threshold) & ~degenerate[:, None] & ~degenerate[None, :]
    adjacency.fill_diagonal_(False)
    n_components, labels = connected_components(csr_matrix(adjacency.numpy()), directed=False)
    members: dict[int, list[int]] = {}
    for unit, label in enumerate(labels.tolist()):
        members.setdefault(label, []).append(unit)
    clusters = [units for units in members.values() if len(units) >= 2]
    clusters.sort(key=lambda c: (-len(c), c[0]))
    return clusters


@register_method
class BreakClones(PeriodicUnitMethod):
    """Escape from the cloned-unit manifold: perturb duplicate units so they stop receiving identical updates.

    Every ``every`` steps the cosine similarity of the units' activations over the last ``window_steps``
    training steps (the paper's duplicate rule: uncentred cosine > ``threshold``; options ``centered``,
    ``absolute``) defines clusters of duplicates (connected components). Gaussian noise with per-entry std
    ``noise_scale * ||w_j|| / sqrt(fan_in)`` is added to the incoming weights of every unit of a cluster
    except its lowest-index unit (``keep_one``; all units otherwise). The similarity is computed from a
    running Gram matrix (:func:`clusters_from_gram`), so the cost per step is one ``(units x units)`` product and
    the memory is constant; the clusters equal ``duplicate_clusters`` on the stacked activations.
    """

    name = "break_clones"
    Config = BreakClonesConfig

    def _new_group_state(self, group: UnitGroup) -> dict[str, Any]:
        units, device = group.num_units, _device_of(group)
        return {
            "gram": torch.zeros(units, units, dtype=torch.float64, device=device),
            "sum": torch.zeros(units, dtype=torch.float64, device=device),
            "count": 0,
        }

    def _on_activation(self, index: int, kind: str, m: torch.Tensor) -> None:
        state = self.stats[index]
        m = m.double()
        state["gram"] += m.T @ m
        state["sum"] += m.sum(dim=0)
        state["count"] += m.shape[0]

    def clusters(self, index: int) -> list[list[int]]:
        """Duplicate clusters of group ``index`` on the statistics collected so far ([] without data)."""
        state = self.stats[index]
        if state["count"] == 0:
            return []
        gram = state["gram"].cpu()
        raw_diagonal = torch.diagonal(gram).clone()
        if self.config.centered:
            mean = (state["sum"] / state["count"]).cpu()
            gram = gram - state["count"] * torch.outer(mean, mean)
        return clusters_from_gram(gram, self.config.threshold, raw_diagonal=raw_diagonal, absolute=self.config.absolute)

    def _check(self, index: int, group: UnitGroup, optimizer: torch.optim.Optimizer | None) -> None:
        clusters = self.clusters(index)
        if not clusters:
            return
        chosen = [unit for cluster in clusters for unit in (cluster[1:] if self.config.keep_one else cluster)]
        mask = torch.zeros(group.num_units, dtype=torch.bool)
        mask[chosen] = True
        add_incoming_noise(group, mask, self.config.noise_scale, self.generator, include_bias=self.config.include_bias)
        if self.config.reset_optimizer:
            reset_optimizer_state(optimizer, group, mask)
        count = int(mask.sum())
        self.replaced_per_group[index] += count
        self.total_replaced += count
        self.events += 1
