"""``diagnose``: name the loss-of-plasticity trap of each layer, show the evidence and rank the cures to try.

Two inputs, one judgement. :func:`measure_model` measures a live model on a probe batch (the Monitor's metrics, live
cloned clusters, weight scale, a plasticity probe), each next to the same measurement on a freshly initialised copy
of the architecture (the *reference*); :func:`measure_rows` reads the tidy metric rows of a stored run, with the
run's first measurement as the reference and the mean over its final window as the value. :func:`judge` then
compares every layer with the thresholds of :class:`DiagnoseConfig` and returns a :class:`Diagnosis`: per layer the
trap (frozen/dead units, saturated units, live cloned units and their clusters, rank collapse, weight growth, sharp
curvature, low plasticity-probe fit), the evidence (metric, reference, threshold, how the paper's theory links it)
and the cures ranked for that trap as ``--method`` specs. Pure analysis: no file, no store, no training run here
(``lopkit.runner.diagnose_cli`` does the I/O and ``--fix``).

The plasticity probe is lopkit's one probe, :func:`lopkit.diagnostics.plasticity.plasticity_probe` (through
:func:`probe_fit`): from a copy of the network, learn its own output plus fresh N(0, 1) noise on the probe for
a few Adam steps and report the fraction of the noise learnt (``probe_fit``, independent of the output scale), next
to the same on the fresh copy. The former quantity, the relative loss drop ``probe_gain`` = 1 - L_after / L_before
fitting a plain N(0, 1) target, is still measured and shown (not judged): it grows with the scale of a trained
network's outputs, so it missed trained networks that fit worse than a fresh one (docs/diagnose.md).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lopkit.configs import require
from lopkit.seeding import derive_seed, rng_sandbox, seeded_generator, stable_key

__all__ = [
    "TRAPS",
    "CURES",
    "Cure",
    "DiagnoseConfig",
    "Diagnosis",
    "Evidence",
    "Finding",
    "LayerMeasure",
    "diagnose",
    "judge",
    "measure_model",
    "measure_rows",
    "probe_fit",
    "probe_gain",
    "format_diagnosis",
]


# ------------------------------------------------------------------------------------------------ configuration
@dataclasses.dataclass
class DiagnoseConfig:
    """Thresholds of ``diagnose`` (defaults and the reason for each: docs/diagnose.md)."""

    dead_fraction: float = 0.10
    """A layer has a dead/frozen-unit trap when at least this fraction of its units is dead ..."""
    dead_rise: float = 0.05
    """... and that is at least this much above the reference (first measurement, or a fresh copy)."""
    saturated_fraction: float = 0.10
    """Saturated-but-not-dead units (|f'(z)| ~ 0 on almost every sample, minus the dead ones): trap level ..."""
    saturated_rise: float = 0.05
    """... and its rise over the reference."""
    clone_fraction: float = 0.05
    """Live cloned units (Pearson correlation above ``clone_similarity`` with a live unit): trap level ..."""
    clone_rise: float = 0.05
    """... and its rise over the reference."""
    clone_similarity: float = 0.98
    """Pearson correlation above which two live units are clones (lopkit's live-clone rule, as bit-flipping's 0.98)."""
    clone_r2: float = 0.99
    """Stored cloning R^2 at or above this means the run sits on the clone manifold (1 = exact clones)."""
    rank_ratio: float = 0.75
    """Rank collapse: effective rank at or below this fraction of the reference's."""
    weight_growth: float = 2.0
    """Weight growth: parameter norm at or above this multiple of the reference's."""
    sharpness_growth: float = 10.0
    """Sharp curvature: top Hessian eigenvalue of the probe loss at or above this multiple of the reference's."""
    plasticity_ratio: float = 0.8
    """Low plasticity: probe fit (the fraction of a fresh N(0, 1) offset of its own output the network learns in the
    probe's steps) at or below this fraction of a freshly initialised copy's fit."""
    probe_min_fit: float = 0.1
    """The low-plasticity rule is judged only when the fresh copy's probe fit reaches this (else the probe is too short
    to tell; raise ``probe_steps``)."""
    probe_steps: int = 200
    """Adam steps of the plasticity probe (fit its own output plus fresh N(0, 1) noise on the probe batch)."""
    probe_lr: float = 3e-3
    """Learning rate of the plasticity probe's Adam."""
    hessian: bool = True
    """Measure the top Hessian eigenvalue of the probe loss (only when a loss is given; 20 power iterations)."""
    final_fraction: float = 0.1
    """Stored runs: the value of a metric is its mean over this final fraction of the measured steps."""
    seed: int = 0
    """Seed of the reference copy's initialisation and of the probe's random target (through lopkit.seeding)."""

    def __post_init__(self) -> None:
        """Validate at construction (ConfigError naming the field)."""
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for impossible values."""
        for name in ("dead_fraction", "dead_rise", "saturated_fraction", "saturated_rise", "clone_fraction",
                     "clone_rise", "clone_r2", "rank_ratio", "plasticity_ratio", "probe_min_fit"):
            value = getattr(self, name)
            require(_is_real(value) and 0.0 <= value <= 1.0, f"DiagnoseConfig.{name} must be in [0, 1], got {value!r}")
        require(_is_real(self.clone_similarity) and -1.0 <= self.clone_similarity < 1.0,
                f"DiagnoseConfig.clone_similarity must be in [-1, 1), got {self.clone_similarity!r}")
        for name in ("weight_growth", "sharpness_growth"):
            value = getattr(self, name)
            require(_is_real(value) and value > 1.0, f"DiagnoseConfig.{name} must be a ratio > 1, got {value!r}")
        require(isinstance(self.probe_steps, int) and not isinstance(self.probe_steps, bool) and self.probe_steps >= 1,
                f"DiagnoseConfig.probe_steps must be a positive integer, got {self.probe_steps!r}")
        require(_is_real(self.probe_lr) and self.probe_lr > 0, f"DiagnoseConfig.probe_lr must be > 0, got {self.probe_lr!r}")
        require(_is_real(self.final_fraction) and 0.0 < self.final_fraction <= 1.0,
                f"DiagnoseConfig.final_fraction must be in (0, 1], got {self.final_fraction!r}")
        require(isinstance(self.hessian, bool), f"DiagnoseConfig.hessian must be True or False, got {self.hessian!r}")
        require(isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0,
                f"DiagnoseConfig.seed must be a non-negative integer, got {self.seed!r}")


def _is_real(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


# ------------------------------------------------------------------------------------------------ traps and cures
@dataclasses.dataclass(frozen=True)
class Cure:
    """One cure to try for a trap: the ``--method`` spec, what kind of cure it is and why it fits."""

    method: str
    kind: str
    why: str


#: trap id -> (label, how the paper's theory links the evidence to the trap)
TRAPS: dict[str, tuple[str, str]] = {
    "dead_units": (
        "frozen/dead units",
        "A unit with f'(z) = 0 on every input gets zero gradient on all its incoming weights and its bias (a dead "
        "ReLU, h = 0, on its outgoing weights too): the network sits on the frozen-unit manifold M_F of Theorem 2.1, "
        "which no gradient step of GD, SGD or Adam leaves; only an input that re-activates the unit or a "
        "re-initialisation can."),
    "saturated_units": (
        "saturated units",
        "A saturated unit (tanh/sigmoid far in its tails, or a unit whose gradient is negligible next to its activity) "
        "has f'(z) ~ 0 while h ~ const: its incoming weights are frozen (M_F) and its outgoing weights act only as a "
        "bias. Theorem 3.1(a): raising the decorrelation strength gamma_phi (larger gain or shift of the "
        "pre-activations) is exactly what drives units into this regime."),
    "cloned_units": (
        "live cloned units",
        "Live units with identical activations form a cluster on the cloned-unit manifold M_C (Theorem 2.1): equal "
        "incoming and outgoing block sums give identical forward values and back-propagated errors, hence "
        "block-constant gradients, so SGD, momentum and Adam can never separate them and the layer computes only one "
        "feature per cluster. Only noise (noisy SGD, dropout) or a reset breaks the symmetry; normalisation does not "
        "break clones that already exist."),
    "rank_collapse": (
        "rank collapse",
        "Theorem 3.1: a nonlinearity raises the Renyi-2 rank of the features unless their correlations are 0 or +-1 "
        "(decorrelation potential Psi(C) = 0); a rank that stays low therefore means orthogonal-or-duplicate geometry "
        "(clones) or frozen units, the compression that steers a network onto the LoP manifolds."),
    "weight_growth": (
        "weight-norm growth",
        "Growing weights scale the pre-activations out of the nonlinear range: a larger effective gain or shift raises "
        "gamma_phi and with it the probability that a unit is frozen (Theorem 3.1(a), App. A.2). The paper treats "
        "weight growth as a symptom (Nikishin et al. 2022; Lyle et al. 2023), not a manifold of its own."),
    "sharp_curvature": (
        "sharp curvature",
        "A large top Hessian eigenvalue of the probe loss makes a step of a given size unstable along that direction; "
        "Lyle et al. (2023) tie loss of plasticity to curvature. Beyond the paper: it defines the stability of an LoP "
        "manifold by the sign of the curvature normal to it (App. A.5) but measures no Hessian."),
    "low_plasticity": (
        "low plasticity-probe fit",
        "A direct test instead of a symptom: from a copy of the network, learn a fresh random offset of its own output "
        "on the probe for a few steps (so the scale the outputs reached in training does not count). A network trapped "
        "on an LoP manifold (frozen or cloned units) moves in fewer directions and learns it less than a freshly "
        "initialised copy of the same architecture does."),
}

_RESET_FROZEN = Cure("reset_frozen", "targeted reset",
                     "re-draws only the units with |f'(z)| < eps on recent samples (zero outgoing weights, mean absorbed "
                     "into the next bias): leaves M_F without changing the function")
_REDO = Cure("redo", "targeted reset", "re-initialises tau-dormant units (Sokar et al. 2023)")
_CBP = Cure("cbp", "continual reset", "replaces the lowest-utility mature units step by step (Dohare et al. 2024); in "
            "the paper's bit-flipping run switching SGD -> CBP restores the rank and lowers the loss")
_LAYERNORM = Cure("layernorm", "prevention (architecture)",
                  "keeps pre-activations centred and scaled; in the paper's E1 runs LayerNorm/BatchNorm keep the rank high "
                  "and remove dead units (Fig. 4.1, B.3); it changes the architecture, so it needs a new run")
_SHRINK_PERTURB = Cure("shrink_perturb", "perturbation",
                       "shrinks every weight and adds fresh init noise (Ash & Adams 2020): moves all units off the manifolds a little")
_BREAK_CLONES = Cure("break_clones", "targeted perturbation",
                     "adds noise to the incoming weights of all but one unit of each duplicate cluster: the symmetry-breaking "
                     "noise Theorem 2.1 says is needed")
_NOISY_SGD = Cure("noisy_sgd", "perturbation", "gradient noise; in the paper's E2 runs one noisy step (sigma_0 = 0.01) "
                  "starts the escape from exact clones")
_DROPOUT = Cure("dropout", "perturbation (architecture)", "independent masks break forward and backward symmetry "
                "(paper E2); it changes the architecture, so it needs a new run")
_L2INIT = Cure("l2init", "regulariser", "pulls the weights back toward their initial values (Kumar et al. 2024)")
_L2 = Cure("l2", "regulariser", "weight decay; bounds the weight norm")
_INFER = Cure("infer", "regulariser", "InFeR: keeps the features able to predict their initial outputs (Lyle et al. 2022)")
_RESET = Cure("reset", "full reset", "re-initialises whole layers; restores plasticity at the price of what they learnt")

#: trap id -> cures, best first
CURES: dict[str, tuple[Cure, ...]] = {
    "dead_units": (_RESET_FROZEN, _REDO, _CBP, _LAYERNORM, _SHRINK_PERTURB),
    "saturated_units": (_RESET_FROZEN, _LAYERNORM, _SHRINK_PERTURB, _CBP),
    "cloned_units": (_BREAK_CLONES, _NOISY_SGD, _CBP, _DROPOUT),
    "rank_collapse": (_CBP, _LAYERNORM, _SHRINK_PERTURB, _INFER),
    "weight_growth": (_L2INIT, _SHRINK_PERTURB, _L2, _LAYERNORM),
    "sharp_curvature": (_LAYERNORM, _L2INIT, _SHRINK_PERTURB),
    "low_plasticity": (_SHRINK_PERTURB, _CBP, _L2INIT, _RESET),
}


# ------------------------------------------------------------------------------------------------ results
@dataclasses.dataclass
class Evidence:
    """One metric behind a finding: its value, the reference, the threshold and the trend over the run."""

    metric: str
    value: float
    threshold: str
    reference: float | None = None
    reference_label: str = ""
    trend: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    judged: bool = True
    """False for a quantity shown beside the judged one for continuity (its ``threshold`` then says why not judged)."""

    def describe(self) -> str:
        """One line: metric, value, reference and threshold (or, not judged, why)."""
        text = f"{self.metric} = {format_number(self.value)}"
        if self.reference is not None:
            text += f" (reference {format_number(self.reference)}: {self.reference_label})"
        return f"{text}; trap when {self.threshold}" if self.judged else f"{text}; not judged: {self.threshold}"


@dataclasses.dataclass
class Finding:
    """One trap found in one layer: its evidence, its severity (how far past the threshold) and the cures."""

    layer: str
    trap: str
    severity: float
    evidence: list[Evidence]
    cures: list[Cure]
    clusters: list[list[int]] = dataclasses.field(default_factory=list)

    @property
    def label(self) -> str:
        """The trap's name in words."""
        return TRAPS[self.trap][0]

    @property
    def theory(self) -> str:
        """How the paper's theory links the evidence to the trap."""
        return TRAPS[self.trap][1]


@dataclasses.dataclass
class LayerMeasure:
    """What was measured on one layer: metric -> value, metric -> reference value, and (stored runs) the trend."""

    values: dict[str, float] = dataclasses.field(default_factory=dict)
    reference: dict[str, float] = dataclasses.field(default_factory=dict)
    trends: dict[str, list[tuple[int, float]]] = dataclasses.field(default_factory=dict)
    clusters: list[list[int]] = dataclasses.field(default_factory=list)
    units: int | None = None


@dataclasses.dataclass
class Diagnosis:
    """The verdict on one model or one stored configuration: findings per layer, what was measured, notes."""

    source: str
    reference_label: str
    findings: list[Finding]
    measures: dict[str, LayerMeasure]
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def healthy(self) -> bool:
        """True when no layer is in any trap (also when nothing was measured: see :attr:`judged`)."""
        return not self.findings

    @property
    def judged(self) -> bool:
        """True when at least one layer had a metric the traps are judged on (:data:`JUDGED_METRICS`)."""
        return any(m.values for m in self.measures.values())

    def traps(self, layer: str | None = None) -> set[str]:
        """Trap ids found (in ``layer`` only, if given)."""
        return {f.trap for f in self.findings if layer is None or f.layer == layer}

    def layers_with(self, trap: str) -> list[str]:
        """Layers where ``trap`` was found, in the order of the findings."""
        return [f.layer for f in self.findings if f.trap == trap]

    def top_cure(self, allowed: Callable[[str], bool] | None = None) -> tuple[Finding, Cure] | None:
        """The first cure (passing ``allowed``) of the top finding that has one, or None.

        Findings are ranked by trap first, in the order of :data:`TRAPS` (the paper's manifolds, which are causes,
        before the symptoms they produce), then by severity (how far past its threshold); severities of different
        traps are not comparable.
        """
        order = list(TRAPS)
        for finding in sorted(self.findings, key=lambda f: (order.index(f.trap), -f.severity)):
            for cure in finding.cures:
                if allowed is None or allowed(cure.method):
                    return finding, cure
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for ``--json`` and tools)."""
        return {
            "source": self.source,
            "reference": self.reference_label,
            "healthy": self.healthy,
            "judged": self.judged,
            "findings": [
                {"layer": f.layer, "trap": f.trap, "label": f.label, "severity": json_float(f.severity),
                 "theory": f.theory, "clusters": f.clusters,
                 "evidence": [{"metric": e.metric, "value": json_float(e.value), "reference": json_float(e.reference),
                               "reference_label": e.reference_label, "threshold": e.threshold, "judged": e.judged,
                               "trend": [[int(s), json_float(v)] for s, v in e.trend]} for e in f.evidence],
                 "cures": [{"rank": i + 1, "method": c.method, "kind": c.kind, "why": c.why}
                           for i, c in enumerate(f.cures)]}
                for f in self.findings
            ],
            "measured": {layer: {"values": {k: json_float(v) for k, v in m.values.items()},
                                 "reference": {k: json_float(v) for k, v in m.reference.items()},
                                 "units": m.units}
                         for layer, m in self.measures.items()},
            "notes": list(self.notes),
        }


def json_float(value: float | None) -> float | None:
    """NaN and None become JSON null."""
    if value is None or not math.isfinite(float(value)):
        return None
    return float(value)


def format_number(value: float | None) -> str:
    """Compact number."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3g}"


# ------------------------------------------------------------------------------------------------ the judgement
def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(float(value))


def _fraction_rule(measure: LayerMeasure, metric: str, level: float, rise: float, ref_label: str,
                   ) -> tuple[float, Evidence] | None:
    """A fraction at or above ``level`` and at least ``rise`` above its reference: (severity, evidence) or None."""
    value = measure.values.get(metric)
    if not _finite(value):
        return None
    reference = measure.reference.get(metric)
    base = reference if _finite(reference) else 0.0
    if value >= level and value - base >= rise:
        threshold = f">= {level:g} and >= {rise:g} above the reference"
        evidence = Evidence(metric, float(value), threshold, reference if _finite(reference) else None, ref_label,
                            measure.trends.get(metric, []))
        return value / max(level, 1e-12), evidence
    return None


def _ratio_rule(measure: LayerMeasure, metric: str, ratio: float, below: bool, ref_label: str,
                ) -> tuple[float, Evidence] | None:
    """value / reference at or below (``below``) or at or above ``ratio``: (severity, evidence) or None."""
    value, reference = measure.values.get(metric), measure.reference.get(metric)
    if not (_finite(value) and _finite(reference)) or reference <= 0:
        return None
    quotient = value / reference
    hit = quotient <= ratio if below else quotient >= ratio
    if not hit:
        return None
    threshold = f"value / reference {'<=' if below else '>='} {ratio:g} (here {quotient:.3g})"
    severity = (ratio / max(quotient, 1e-12)) if below else quotient / ratio
    return severity, Evidence(metric, float(value), threshold, float(reference), ref_label, measure.trends.get(metric, []))


def _plasticity_rule(measure: LayerMeasure, ratio: float, ref_label: str, min_fit: float = 0.1,
                     ) -> list[tuple[float, Evidence] | None]:
    """Low plasticity: ``probe_fit`` / its reference at or below ``ratio`` (judged when the reference >= ``min_fit``).

    Evidence: the judged ``probe_fit``, then the former ``probe_gain`` (not judged, for continuity). Severity is
    ``ratio / quotient`` with the quotient floored at 0.01 (a fit at or below 0, no better than a constant, gives 100
    times the ratio).
    """
    value, reference = measure.values.get("probe_fit"), measure.reference.get("probe_fit")
    if not (_finite(value) and _finite(reference)) or reference <= 0 or reference < min_fit:
        return []
    quotient = value / reference
    if quotient > ratio:
        return []
    threshold = f"value / reference <= {ratio:g} (here {quotient:.3g})"
    hits: list[tuple[float, Evidence] | None] = [
        (ratio / max(quotient, 0.01), Evidence("probe_fit", float(value), threshold, float(reference), ref_label,
                                               measure.trends.get("probe_fit", [])))]
    gain, gain_reference = measure.values.get("probe_gain"), measure.reference.get("probe_gain")
    if _finite(gain):
        here = f" (ratio here {gain / gain_reference:.3g})" if _finite(gain_reference) and gain_reference > 0 else ""
        former = (f"the former quantity, shown for continuity{here}; 1 - L_after / L_before fitting an N(0, 1) target "
                  "grows with the scale of a trained network's outputs")
        hits.append((0.0, Evidence("probe_gain", float(gain), former,
                                   float(gain_reference) if _finite(gain_reference) else None, ref_label,
                                   measure.trends.get("probe_gain", []), judged=False)))
    return hits


def judge(measures: Mapping[str, LayerMeasure], config: DiagnoseConfig | None = None, *, source: str = "",
          reference_label: str = "reference", notes: Sequence[str] = ()) -> Diagnosis:
    """Compare every layer's measurements with the thresholds; findings in layer order, traps in :data:`TRAPS` order."""
    config = config or DiagnoseConfig()
    ref = reference_label
    findings: list[Finding] = []

    def add(layer: str, trap: str, hits: list[tuple[float, Evidence] | None], clusters: list[list[int]] = ()) -> None:
        found = [h for h in hits if h is not None]
        if found:
            findings.append(Finding(layer, trap, max(s for s, _ in found), [e for _, e in found], list(CURES[trap]),
                                    [list(c) for c in clusters]))

    for layer, m in measures.items():
        add(layer, "dead_units", [_fraction_rule(m, "dead_fraction", config.dead_fraction, config.dead_rise, ref)])
        # derivative-based only: the paper's gradient-ratio saturation also fires on any well-fitted network (dL/dh
        # ~ 0 once the loss is ~ 0), so it is measured and shown but not judged (docs/diagnose.md)
        add(layer, "saturated_units", [
            _fraction_rule(m, "frozen_not_dead_fraction", config.saturated_fraction, config.saturated_rise, ref)])
        clone_hits = [_fraction_rule(m, "live_clone_fraction", config.clone_fraction, config.clone_rise, ref)]
        if "live_clone_fraction" not in m.values:  # the paper's (uncentred) duplicate fraction when nothing better
            clone_hits.append(_fraction_rule(m, "duplicate_fraction", config.clone_fraction, config.clone_rise, ref))
        for name in ("cloning_r2_forward", "cloning_r2_variance_ratio_forward"):
            value = m.values.get(name)
            if _finite(value) and value >= config.clone_r2:
                clone_hits.append((1.0 + value, Evidence(name, float(value), f">= {config.clone_r2:g} (1 = exact clones)",
                                                         None, "", m.trends.get(name, []))))
        add(layer, "cloned_units", clone_hits, m.clusters)
        add(layer, "rank_collapse", [_ratio_rule(m, "effective_rank", config.rank_ratio, True, ref)])
        add(layer, "weight_growth", [_ratio_rule(m, "weight_norm", config.weight_growth, False, ref)])
        add(layer, "sharp_curvature", [_ratio_rule(m, "hessian_top_eigenvalue", config.sharpness_growth, False, ref)])
        add(layer, "low_plasticity", _plasticity_rule(m, config.plasticity_ratio, ref, config.probe_min_fit))
    order = {name: i for i, name in enumerate(measures)}
    findings.sort(key=lambda f: (order[f.layer], list(TRAPS).index(f.trap)))
    return Diagnosis(source, reference_label, findings, dict(measures), list(notes))


# ------------------------------------------------------------------------------------------------ stored rows
def _derived(values: dict[str, float]) -> None:
    """Add the saturated-but-not-dead fractions (the saturated trap) where their inputs exist."""
    dead = values.get("dead_fraction")
    if not _finite(dead):
        return
    for name, out in (("saturated_fraction", "saturated_not_dead_fraction"), ("frozen_fraction", "frozen_not_dead_fraction")):
        if _finite(values.get(name)):
            values[out] = max(0.0, values[name] - dead)


#: stored metrics the judgement reads (and the model path measures under the same names)
JUDGED_METRICS = ("dead_fraction", "frozen_fraction", "saturated_fraction", "duplicate_fraction", "live_clone_fraction",
                  "effective_rank", "weight_norm", "hessian_top_eigenvalue", "probe_fit", "probe_gain",
                  "cloning_r2_forward",
                  "cloning_r2_variance_ratio_forward")


def measure_rows(rows: Any, config: DiagnoseConfig | None = None) -> dict[str, LayerMeasure]:
    """Per-layer measures of one configuration's stored rows (a DataFrame with run_id, step, layer, metric, value).

    Per run: the reference is the metric's first measured value, the value the mean over the final
    ``config.final_fraction`` of its measured steps, the trend its (step, value) series; then means over runs (seeds).
    """
    config = config or DiagnoseConfig()
    frame = rows[rows["metric"].isin(JUDGED_METRICS)].dropna(subset=["value"])
    measures: dict[str, LayerMeasure] = {}
    for layer in dict.fromkeys(frame["layer"]):
        sub = frame[frame["layer"] == layer]
        measure = LayerMeasure()
        for metric, per_metric in sub.groupby("metric", sort=False):
            firsts, finals, series = [], [], {}
            for _, run in per_metric.groupby("run_id", sort=False):
                run = run.sort_values("step")
                steps = run["step"].to_numpy()
                start = steps.min() + (1.0 - config.final_fraction) * (steps.max() - steps.min())
                firsts.append(float(run["value"].iloc[0]))
                finals.append(float(run.loc[run["step"] >= start, "value"].mean()))
                for step, value in zip(steps.tolist(), run["value"].tolist()):
                    series.setdefault(int(step), []).append(float(value))
            measure.values[metric] = sum(finals) / len(finals)
            if metric not in ("cloning_r2_forward", "cloning_r2_variance_ratio_forward"):
                measure.reference[metric] = sum(firsts) / len(firsts)
            measure.trends[metric] = _thin([(s, sum(v) / len(v)) for s, v in sorted(series.items())])
        _derived(measure.values)
        _derived(measure.reference)
        dead = dict(measure.trends.get("dead_fraction", []))
        frozen = measure.trends.get("frozen_fraction", [])
        if dead and frozen:  # the saturated trap's trend: frozen minus dead at the steps both were shown
            measure.trends["frozen_not_dead_fraction"] = [(s, max(0.0, v - dead[s])) for s, v in frozen if s in dead]
        measures[str(layer)] = measure
    return measures


def _thin(series: list[tuple[int, float]], points: int = 12) -> list[tuple[int, float]]:
    """At most ``points`` evenly spaced entries of a series (first and last kept)."""
    if len(series) <= points:
        return series
    index = sorted({round(i * (len(series) - 1) / (points - 1)) for i in range(points)})
    return [series[i] for i in index]


# ------------------------------------------------------------------------------------------------ live models
def default_loss(output: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy for integer targets, mean squared error otherwise."""
    if not target.dtype.is_floating_point:
        return F.cross_entropy(output, target)
    if target.numel() != output.numel():
        raise ValueError(f"float targets {tuple(target.shape)} have a different size from the output {tuple(output.shape)}")
    return F.mse_loss(output, target.reshape(output.shape))


def fresh_copy(model: nn.Module, seed: int) -> nn.Module:
    """A deep copy of ``model`` with every ``reset_parameters`` re-run under a generator seeded from ``seed``."""
    twin = copy.deepcopy(model)
    with rng_sandbox():
        torch.manual_seed(derive_seed(seed, stable_key("diagnose_reference")))
        for module in twin.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    return twin


def random_target(output: Tensor, seed: int) -> Tensor:
    """A standard-normal target shaped like the model output, from the seeding helper."""
    generator = seeded_generator(seed, stable_key("diagnose_probe_target"))
    return torch.randn(output.shape, generator=generator, dtype=torch.float32).to(output.device, output.dtype)


def probe_fit(model: nn.Module, probe_x: Tensor, steps: int = 200, lr: float = 3e-3, seed: int = 0,
              ) -> dict[str, float]:
    """diagnose's plasticity probe: fit the network's own output plus fresh N(0, 1) noise for ``steps`` Adam steps.

    The one plasticity probe of lopkit (:func:`lopkit.diagnostics.plasticity.plasticity_probe` with
    ``target="residual"``, frozen parameters stay frozen) on a deep copy in eval mode; ``model`` is untouched. Its
    whole result; the judged quantity is ``fit``, the fraction of the noise the copy has learnt (R^2 around its own
    start, ~1 - L_after / L_before), which does not depend on the scale of the outputs. Every value is NaN when no
    parameter trains.
    """
    from lopkit.diagnostics.plasticity import plasticity_probe

    if not any(p.requires_grad for p in model.parameters()):
        names = ("loss_before", "loss_after", "drop", "gain", "loss_constant", "fit", "loss_auc")
        return {k: float("nan") for k in names}
    return plasticity_probe(model, probe_x, steps=steps, seed=seed, lr=lr, target="residual")


def probe_gain(model: nn.Module, probe_x: Tensor, steps: int = 200, lr: float = 3e-3, seed: int = 0) -> float:
    """The former judged quantity (shown, not judged): gain 1 - L_after / L_before fitting a fresh N(0, 1) target.

    :func:`lopkit.diagnostics.plasticity.plasticity_probe` with ``target="random"``; it grows with the scale of a
    trained network's outputs (docs/diagnose.md), so :func:`probe_fit` is judged instead. NaN when nothing trains.
    """
    from lopkit.diagnostics.plasticity import plasticity_probe

    if not any(p.requires_grad for p in model.parameters()):
        return float("nan")
    return float(plasticity_probe(model, probe_x, steps=steps, seed=seed, lr=lr)["gain"])


def _capture_activations(model: nn.Module, probe_x: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """Outputs of the named modules on the probe (eval mode, no grad; a module called twice keeps its first call)."""
    from lopkit.diagnostics.units import as_unit_matrix

    captured: dict[str, Tensor] = {}
    modules = dict(model.named_modules())
    handles = []
    for name in names:
        if name not in modules:
            continue

        def hook(module: nn.Module, inputs: Any, output: Any, name: str = name) -> None:
            if isinstance(output, Tensor) and name not in captured and output.dim() >= 2:
                captured[name] = as_unit_matrix(output.detach()).clone()

        handles.append(modules[name].register_forward_hook(hook))
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(probe_x)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    return captured


def _clone_stats(h: Tensor, config: DiagnoseConfig, dead_threshold: float, dead_samples: float,
                 ) -> tuple[float, list[list[int]]]:
    """Live clone fraction and clusters of live clones (Pearson > ``clone_similarity``, dead units left out)."""
    from lopkit.diagnostics.activations import dead_unit_mask
    from lopkit.diagnostics.similarity import duplicate_clusters, live_clone_fraction

    dead = dead_unit_mask(h, dead_threshold, dead_samples)
    fraction = live_clone_fraction(h, config.clone_similarity, dead=dead)
    live = torch.nonzero(~dead).flatten()
    clusters = []
    if live.numel() >= 2:
        clusters = [[int(live[i]) for i in c] for c in duplicate_clusters(h[:, live], config.clone_similarity, centered=True)]
    return fraction, clusters


def _weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear and Conv modules (their parameter norm is the weight-growth evidence)."""
    from lopkit.diagnostics.monitor import PARAMETRIC_TYPES

    return [(name, m) for name, m in model.named_modules() if isinstance(m, PARAMETRIC_TYPES)]


def _monitor_values(model: nn.Module, probe_x: Tensor, probe_y: Tensor | None, loss_fn: Callable | None,
                    config: DiagnoseConfig) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Monitor metrics of the model on the probe, per layer (plus the model-level loss/Hessian under ``model``)."""
    import warnings

    from lopkit.diagnostics.monitor import Monitor, MonitorConfig

    wanted = ["dead_fraction", "frozen_fraction", "duplicate_fraction", "effective_rank", "weight_norm"]
    with_loss = probe_y is not None
    if with_loss:
        wanted += ["saturated_fraction", "loss"]
        if config.hessian:
            wanted.append("hessian_top_eigenvalue")
    monitor_config = MonitorConfig(hessian=with_loss and config.hessian, seed=config.seed, warnings="ignore",
                                   warn_constant_units=False)
    monitor = Monitor(model, metrics=wanted, config=monitor_config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = monitor.measure(probe_x, probe_y, loss_fn if with_loss else None)
    per_layer: dict[str, dict[str, float]] = {}
    for row in rows:
        per_layer.setdefault(row["layer"], {})[row["metric"]] = row["value"]
    activations = [layer.name for layer in monitor.layers if layer.kind == "activation"]
    return per_layer, activations


def _measure_one(model: nn.Module, probe_x: Tensor, probe_y: Tensor | None, loss_fn: Callable | None,
                 config: DiagnoseConfig) -> tuple[dict[str, dict[str, float]], dict[str, list[list[int]]], dict[str, int]]:
    """Every judged metric of one model: per-layer values, clone clusters and unit counts of the activation layers."""
    from lopkit.diagnostics.monitor import MonitorConfig

    per_layer, activations = _monitor_values(model, probe_x, probe_y, loss_fn, config)
    defaults = MonitorConfig()
    captured = _capture_activations(model, probe_x, activations)
    clusters: dict[str, list[list[int]]] = {}
    units: dict[str, int] = {}
    for name, h in captured.items():
        fraction, found = _clone_stats(h, config, defaults.dead_threshold, defaults.dead_sample_fraction)
        per_layer.setdefault(name, {})["live_clone_fraction"] = fraction
        clusters[name], units[name] = found, int(h.shape[1])
    weight_layers = _weight_layers(model)
    head = weight_layers[-1][0] if weight_layers else None
    for name in list(per_layer):
        if name not in activations:  # unit metrics on weight-layer outputs are not judged (the activations are)
            per_layer[name] = {k: v for k, v in per_layer[name].items()
                               if k in ("weight_norm", "loss", "hessian_top_eigenvalue")}
        if name == head:  # the output head's norm is the logits' scale (it grows with any fit), not a hidden trap
            per_layer.pop(name)
    fit = probe_fit(model, probe_x, config.probe_steps, config.probe_lr, config.seed)["fit"]
    gain = probe_gain(model, probe_x, config.probe_steps, config.probe_lr, config.seed)
    per_layer.setdefault("model", {}).update(probe_fit=fit, probe_gain=gain)
    for values in per_layer.values():
        _derived(values)
    return per_layer, clusters, units


def check_probe(model: nn.Module, probe_x: Any, probe_y: Any = None, loss_fn: Callable | None = None) -> None:
    """ValueError (one line saying what to pass) when the probe cannot go through the model or match its targets."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"diagnose needs a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(probe_x, Tensor):
        raise ValueError(f"the probe must be a tensor of inputs (N, ...), got {type(probe_x).__name__}")
    if probe_x.dim() < 2 or probe_x.shape[0] < 2:
        raise ValueError(f"the probe must be a batch of at least 2 samples (N, ...), got shape {tuple(probe_x.shape)}")
    from lopkit.diagnostics.monitor import check_batched_probe

    check_batched_probe(model, probe_x)
    try:
        with torch.no_grad():
            output = copy.deepcopy(model).eval()(probe_x)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"the probe of shape {tuple(probe_x.shape)} does not fit the model ({first}); pass inputs shaped "
                         "like a training batch") from None
    if not isinstance(output, Tensor):
        raise ValueError(f"the model returns {type(output).__name__}, not a tensor; wrap it so it returns its output tensor")
    if probe_y is not None:
        if not isinstance(probe_y, Tensor):
            raise ValueError(f"probe targets must be a tensor, got {type(probe_y).__name__}")
        if probe_y.shape[0] != probe_x.shape[0]:
            raise ValueError(f"probe targets have {probe_y.shape[0]} rows but the probe has {probe_x.shape[0]} samples; "
                             "pass one target per probe sample")
        try:
            loss = (loss_fn or default_loss)(output, probe_y)
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"the loss cannot compare the model output {tuple(output.shape)} with probe targets "
                             f"{tuple(probe_y.shape)} ({first}); pass class indices (N,) or targets shaped like the "
                             "output, or a loss_fn") from None
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn(output, targets) must return a scalar tensor")


def measure_model(model: nn.Module, probe_x: Tensor, probe_y: Tensor | None = None,
                  loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
                  config: DiagnoseConfig | None = None) -> dict[str, LayerMeasure]:
    """Per-layer measures of a live model on a probe, each with the same measure of a fresh copy as its reference.

    ``loss_fn(output, probe_y)`` defaults to cross-entropy for integer targets, MSE otherwise; without ``probe_y``
    the gradient metrics (saturated fraction, Hessian) are skipped. The model is not modified.
    """
    config = config or DiagnoseConfig()
    if probe_y is not None and loss_fn is None:
        loss_fn = default_loss
    check_probe(model, probe_x, probe_y, loss_fn)
    values, clusters, units = _measure_one(model, probe_x, probe_y, loss_fn, config)
    reference, _, _ = _measure_one(fresh_copy(model, config.seed), probe_x, probe_y, loss_fn, config)
    measures: dict[str, LayerMeasure] = {}
    for layer, metrics in values.items():
        measures[layer] = LayerMeasure(dict(metrics), dict(reference.get(layer, {})), {}, clusters.get(layer, []),
                                       units.get(layer))
    return measures


def diagnose(model: nn.Module, probe_x: Tensor, probe_y: Tensor | None = None,
             loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
             config: DiagnoseConfig | None = None) -> Diagnosis:
    """Name the plasticity trap of each layer of ``model`` on the probe batch, with evidence and ranked cures."""
    config = config or DiagnoseConfig()
    measures = measure_model(model, probe_x, probe_y, loss_fn, config)
    notes = ["Reference: the same measurement on a copy of the architecture freshly initialised (reset_parameters, "
             f"seed {config.seed}); value and reference use the same probe batch of {probe_x.shape[0]} samples.",
             f"Plasticity probe: lopkit.diagnostics.plasticity.plasticity_probe, {config.probe_steps} Adam steps at lr "
             f"{config.probe_lr:g} on the probe. Judged: probe_fit, the fraction of a fresh N(0, 1) offset of its own "
             "output the copy learns (target='residual'; R^2 around its start, independent of the output scale), "
             "against the fresh copy's. Shown, not judged: the former probe_gain = 1 - L_after / L_before fitting "
             "an N(0, 1) target, which grows with the scale of a trained network's outputs."]
    notes.append("Weight growth is judged on the hidden weight layers; the output head (the last Linear/Conv) is left "
                 "out, its norm is the scale of the logits and grows with any fit.")
    if probe_y is None:
        notes.append("No probe targets: the gradient-ratio saturation (needs dL/dh) and the Hessian were not measured.")
    return judge(measures, config, source=f"{type(model).__name__} on a probe of shape {tuple(probe_x.shape)}",
                 reference_label="fresh copy", notes=notes)


# ------------------------------------------------------------------------------------------------ text
def format_diagnosis(diagnosis: Diagnosis) -> str:
    """Terminal text: one block per finding (trap, evidence, theory, cures), or a line saying no trap was found."""
    lines = [f"diagnosis of {diagnosis.source}"]
    if not diagnosis.judged:
        lines.append("  nothing judged: the rows hold none of the per-layer unit metrics the traps are judged on "
                     f"({', '.join(JUDGED_METRICS[:6])}, ...); record them with the Monitor (monitor_every > 0) "
                     "and diagnose again")
    elif diagnosis.healthy:
        lines.append("  no trap found: every layer is within the thresholds (see --json for the measured values)")
    explained: dict[str, str] = {}
    for finding in diagnosis.findings:
        lines.append(f"  [{finding.layer}] {finding.label} (severity {finding.severity:.2g})")
        for evidence in finding.evidence:
            lines.append(f"    evidence: {evidence.describe()}")
            if evidence.trend:
                trend = ", ".join(f"{s}:{format_number(v)}" for s, v in evidence.trend)
                lines.append(f"    trend (step:value): {trend}")
        if finding.clusters:
            shown = "; ".join(str(c) for c in finding.clusters[:5])
            more = f" (+{len(finding.clusters) - 5} more)" if len(finding.clusters) > 5 else ""
            lines.append(f"    clusters of live clones ({len(finding.clusters)}): {shown}{more}")
        if finding.trap in explained:
            lines.append(f"    theory: as for {explained[finding.trap]} above")
        else:
            explained[finding.trap] = finding.layer
            lines.append(f"    theory: {finding.theory}")
        cures = "; ".join(f"{i + 1}. --method {c.method} ({c.kind})" for i, c in enumerate(finding.cures))
        lines.append(f"    cures: {cures}")
    for note in diagnosis.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)
