"""The paper's theory as tested code: LoP manifolds (frozen and cloned units), exact cloning, the rank-gain bound."""

from lopkit.theory.cloning import clone
from lopkit.theory.invariance import track_clone_training
from lopkit.theory.manifolds import (
    block_constancy_residual,
    frozen_units,
    incoming_sums_residual,
    make_equitable_nonconstant,
    outgoing_sums_residual,
    random_equitable_perturbation,
)
from lopkit.theory.partition import Partition
from lopkit.theory.rank_bound import (
    RankGainCheck,
    check_rank_gain_bound,
    correlation_kernel,
    decorrelation_potential,
    decorrelation_strength,
    frozen_probability,
    linearity_coefficient,
    renyi2_rank,
)

__all__ = [
    "clone", "Partition", "track_clone_training", "block_constancy_residual", "frozen_units", "incoming_sums_residual",
    "make_equitable_nonconstant", "outgoing_sums_residual", "random_equitable_perturbation", "RankGainCheck",
    "check_rank_gain_bound", "correlation_kernel", "decorrelation_potential", "decorrelation_strength",
    "frozen_probability", "linearity_coefficient", "renyi2_rank",
]
