"""E4: numerical validation of Theorem 3.1 (App. A.1, A.2) -- table of alpha/gamma/P(frozen) and figures.

Prints alpha, gamma and P(frozen) for the spec's activations and modulated activations next to the
spec's reference values, writes them to ``theory_table.csv`` and saves four PNG figures:

* ``fig_a1_quartic_gap.png``   gap r^2 - K(r)^2 against Lemma A.1's bound gamma r^2 (1 - r^2)   (Fig. A.1 top)
* ``fig_a1_rank_ratio.png``    er2(K(C))/er2(C) against 1 + gamma Psi/||C||_F^2 along C(lambda)  (Fig. A.1 bottom)
* ``fig_a2_gamma_frozen.png``  gamma and P(frozen) against ReLU bias and tanh gain               (Fig. A.2)
* ``fig_a3_gamma_vs_frozen.png`` gamma against P(frozen) as mean and scale vary                  (Fig. A.3)

Usage: ``python benchmarks/theory_numerics.py [--out out/theory] [--dim 40] [--seed 0]`` (CPU, ~10 s).
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lopkit.theory.rank_bound import (  # noqa: E402
    check_rank_gain_bound,
    correlation_path,
    decorrelation_strength,
    frozen_probability,
    linearity_coefficient,
    quartic_gap,
    quartic_gap_bound,
    random_correlation_matrix,
)

TANH_GAIN_CAP = (1 - 2 / math.pi) / (1 + 2 / math.pi)

# (label, activation, scale, shift, spec alpha, spec gamma, spec P(frozen)); None = not in the spec table
TABLE_ROWS = [
    ("ReLU", "relu", 1.0, 0.0, 0.7335, 0.1538, 0.50),
    ("GELU", "gelu", 1.0, 0.0, 0.723, 0.161, None),
    ("tanh", "tanh", 1.0, 0.0, 0.931, 0.036, 0.003),
    ("ELU", "elu", 1.0, 0.0, 0.935, 0.034, None),
    ("SELU", "selu", 1.0, 0.0, 0.97, 0.016, None),
    ("sigmoid", "sigmoid", 1.0, 0.0, 0.984, 0.008, None),
    ("softplus", "softplus", 1.0, 0.0, None, None, None),
    ("SiLU", "silu", 1.0, 0.0, None, None, None),
    ("leaky ReLU", "leaky_relu", 1.0, 0.0, None, None, None),
    ("ReLU(z-1)", "relu", 1.0, -1.0, None, 0.589, 0.84),
    ("ReLU(z-2)", "relu", 1.0, -2.0, None, 0.835, 0.977),
    ("ReLU(z-3)", "relu", 1.0, -3.0, None, 0.965, 0.9987),
    ("tanh(2z)", "tanh", 2.0, 0.0, None, 0.088, 0.095),
    ("tanh(5z)", "tanh", 5.0, 0.0, None, 0.155, 0.447),
    ("tanh(20z)", "tanh", 20.0, 0.0, None, 0.205, 0.82),
    ("tanh(1000z)", "tanh", 1000.0, 0.0, None, TANH_GAIN_CAP, 1.0),
    ("tanh(5(z+2))", "tanh", 5.0, 10.0, None, 0.70, 0.90),
]

GAP_ACTIVATIONS = [("ReLU", "relu", 1.0, 0.0), ("tanh", "tanh", 1.0, 0.0), ("GELU", "gelu", 1.0, 0.0),
                   ("SELU", "selu", 1.0, 0.0), ("ReLU(z-2)", "relu", 1.0, -2.0), ("tanh(5(z+2))", "tanh", 5.0, 10.0)]


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def compute_table() -> list[dict]:
    """alpha, gamma and P(|d/dz phi(az+b)| < 0.01) for every row, with the spec's reference values."""
    rows = []
    for label, name, scale, shift, spec_alpha, spec_gamma, spec_p in TABLE_ROWS:
        rows.append({
            "activation": label,
            "alpha": linearity_coefficient(name, scale, shift),
            "gamma": decorrelation_strength(name, scale, shift),
            "p_frozen": frozen_probability(name, scale, shift),
            "spec_alpha": spec_alpha,
            "spec_gamma": spec_gamma,
            "spec_p_frozen": spec_p,
        })
    return rows


def print_table(rows: list[dict]) -> None:
    """Print the table with the spec's values alongside."""
    header = (
        f"{'activation':14s} {'alpha':>8s} {'gamma':>8s} {'P(frozen)':>10s} | "
        f"{'spec a':>7s} {'spec g':>7s} {'spec P':>7s}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['activation']:14s} {row['alpha']:8.4f} {row['gamma']:8.4f} {row['p_frozen']:10.4f} | "
            f"{_fmt(row['spec_alpha'], 3):>7s} {_fmt(row['spec_gamma'], 3):>7s} {_fmt(row['spec_p_frozen'], 4):>7s}"
        )


def write_table(rows: list[dict], path: Path) -> None:
    """Save the table as CSV."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_quartic_gap(path: Path) -> float:
    """Fig. A.1 (top): gap vs bound over r; returns the smallest gap - bound (>= 0 when Lemma A.1 holds)."""
    r = np.linspace(-1.0, 1.0, 201)
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5), sharex=True)
    worst = math.inf
    for ax, (label, name, scale, shift) in zip(axes.ravel(), GAP_ACTIVATIONS):
        gap = quartic_gap(name, r, scale, shift)
        bound = quartic_gap_bound(name, r, scale, shift)
        worst = min(worst, float(np.min(gap - bound)))
        gamma = decorrelation_strength(name, scale, shift)
        ax.plot(r, gap, lw=2, label=r"gap $r^2 - K(r)^2$")
        ax.plot(r, bound, "--", lw=2, label=r"bound $\gamma r^2(1-r^2)$")
        ax.fill_between(r, bound, gap, alpha=0.15)
        ax.set_title(f"{label}  ($\\gamma$ = {gamma:.3f})")
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("pre-activation correlation r")
    axes[0, 0].legend(loc="upper center", fontsize=9)
    fig.suptitle("Lemma A.1: quartic gap stays above the universal bound")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return worst


def plot_rank_ratio(path: Path, dim: int, seed: int) -> bool:
    """Fig. A.1 (bottom): actual er2 ratio vs Theorem 3.1's bound along C(lambda); returns whether it always held."""
    target = random_correlation_matrix(dim, seed=seed, n_samples=max(2, dim // 5))
    lambdas, path_matrices = correlation_path(target, 21)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    all_hold = True
    for index, (label, name, scale, shift) in enumerate(GAP_ACTIVATIONS[:5]):
        checks = [check_rank_gain_bound(C, name, scale, shift) for C in path_matrices]
        all_hold &= all(c.holds for c in checks)
        color = f"C{index}"
        ax.plot(lambdas, [c.ratio for c in checks], "-", color=color, lw=2, label=f"{label} actual")
        ax.plot(lambdas, [c.bound for c in checks], "--", color=color, lw=1.5, label=f"{label} bound")
    ax.set_yscale("log")
    ax.set_xlabel(r"$\lambda$   in   $C(\lambda) = (1-\lambda) I + \lambda C$")
    ax.set_ylabel(r"$er_2(K(C)) / er_2(C)$")
    ax.set_title(f"Theorem 3.1 along a path (d = {dim}, target rank {max(2, dim // 5)})")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return all_hold


def plot_gamma_frozen(path: Path) -> None:
    """Fig. A.2: gamma and P(frozen) against the ReLU bias and the tanh gain."""
    biases = np.linspace(-4.0, 2.0, 61)
    gains = np.geomspace(0.1, 300.0, 61)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.plot(biases, [decorrelation_strength("relu", 1.0, b) for b in biases], lw=2, label=r"$\gamma$")
    left.plot(biases, [frozen_probability("relu", 1.0, b) for b in biases], "--", lw=2, label="P(frozen)")
    left.set_xlabel("bias b in ReLU(z + b)")
    left.set_title("ReLU: more negative bias -> more decorrelation, more frozen")
    right.semilogx(gains, [decorrelation_strength("tanh", a) for a in gains], lw=2, label=r"$\gamma$")
    right.semilogx(gains, [frozen_probability("tanh", a) for a in gains], "--", lw=2, label="P(frozen)")
    right.axhline(TANH_GAIN_CAP, color="gray", ls=":", label=r"cap $(1-2/\pi)/(1+2/\pi)$")
    right.set_xlabel("gain a in tanh(a z)")
    right.set_title(r"tanh: gain alone caps $\gamma$ at 0.222")
    for ax in (left, right):
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gamma_vs_frozen(path: Path) -> None:
    """Fig. A.3: gamma against P(frozen) for every activation as the pre-activation mean and scale vary."""
    means = np.linspace(-3.0, 3.0, 13)
    scales = np.array([0.5, 1.0, 2.0, 5.0])
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for index, name in enumerate(["relu", "tanh", "sigmoid", "gelu", "elu", "selu", "silu", "softplus"]):
        points = [
            (frozen_probability(name, s, s * m), decorrelation_strength(name, s, s * m)) for s in scales for m in means
        ]
        p, g = np.array(points).T
        ax.scatter(p, g, s=14, color=f"C{index}", label=name, alpha=0.8)
    ax.set_xlabel("P(|d/dz phi(a z + b)| < 0.01)")
    ax.set_ylabel(r"decorrelation strength $\gamma$")
    ax.set_title(r"$\gamma$ vs frozen probability (mean $b/a \in [-3, 3]$, scale $a \in \{0.5,1,2,5\}$)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Print the table and write the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/theory"), help="output directory for PNGs and CSV")
    parser.add_argument("--dim", type=int, default=40, help="dimension of the random correlation matrix")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random correlation matrix")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = compute_table()
    print_table(rows)
    write_table(rows, args.out / "theory_table.csv")
    worst = plot_quartic_gap(args.out / "fig_a1_quartic_gap.png")
    held = plot_rank_ratio(args.out / "fig_a1_rank_ratio.png", args.dim, args.seed)
    plot_gamma_frozen(args.out / "fig_a2_gamma_frozen.png")
    plot_gamma_vs_frozen(args.out / "fig_a3_gamma_vs_frozen.png")
    print(f"\nLemma A.1: min(gap - bound) over r = {worst:.3e} ({'holds' if worst >= -1e-12 else 'VIOLATED'})")
    print(f"Theorem 3.1 along the path: {'holds at every lambda' if held else 'VIOLATED'}")
    print(f"wrote {args.out}/ (table CSV + 4 PNGs) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
