"""Per-layer plasticity diagnostics: pure metric functions over activation tensors and a hook-based ``Monitor``.

Every metric works on a ``(samples, units)`` matrix; convolution outputs ``(N, C, H, W)`` are read with channels
as units and spatial positions as samples (``as_unit_matrix``).
"""

from lopkit.diagnostics.activations import (
    dead_fraction,
    dead_unit_mask,
    dormant_fraction,
    dormant_scores,
    dormant_unit_mask,
    frozen_fraction,
    frozen_unit_mask,
    saturated_fraction,
    saturated_unit_mask,
)
from lopkit.diagnostics.cloning import block_means, cloning_r2
from lopkit.diagnostics.curvature import gradient_norm, parameter_norm, top_hessian_eigenvalue
from lopkit.diagnostics.errors import LopkitWarning
from lopkit.diagnostics.monitor import Monitor, MonitorConfig
from lopkit.diagnostics.plasticity import (
    active_fraction,
    churn,
    distance_from_init,
    feature_norm,
    grama_dormant_fraction,
    plasticity_probe,
)
from lopkit.diagnostics.rank import (
    correlation_matrix,
    correlation_rank,
    effective_rank,
    numerical_rank,
    renyi2_rank,
    stable_rank,
)
from lopkit.diagnostics.similarity import (
    cosine_similarity_matrix,
    duplicate_clusters,
    duplicate_fraction,
    duplicate_unit_mask,
    live_clone_fraction,
)
from lopkit.diagnostics.units import activation_derivative, as_unit_matrix

__all__ = [
    "dead_fraction", "dead_unit_mask", "live_clone_fraction", "dormant_fraction", "dormant_scores", "dormant_unit_mask", "frozen_fraction",
    "frozen_unit_mask", "saturated_fraction", "saturated_unit_mask", "block_means", "cloning_r2", "gradient_norm",
    "parameter_norm", "top_hessian_eigenvalue", "LopkitWarning", "Monitor", "MonitorConfig", "correlation_matrix",
    "correlation_rank", "effective_rank", "numerical_rank", "renyi2_rank", "stable_rank", "cosine_similarity_matrix",
    "duplicate_clusters", "duplicate_fraction", "duplicate_unit_mask", "activation_derivative", "as_unit_matrix",
    "active_fraction", "churn", "distance_from_init", "feature_norm", "grama_dormant_fraction", "plasticity_probe",
]
