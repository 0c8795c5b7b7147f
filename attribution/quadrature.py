"""Quadrature rules for the integrated Jacobians: where on the path the engine differentiates, and
with which weights.

Each tower's factor is a one-dimensional integral over α ∈ [0, 1] (α = 1 the input, α = 0 the
reference), and the interactions are bilinear in the two factors, so any rule applies per tower as
weighted points. ``riemann`` is the authors' right Riemann sum (α = 1, 1 − 1/N, …, 1/N, equal
weights): the engine averages its points exactly as before, bit for bit. The nested rules re-use every
point when N − 1 doubles (N = 2, 3, 5, 9, 17, …), which gives a tolerance its error estimate for the
price of the points alone. ``docs/method.md`` records what each rule costs for what accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from attribution.errors import InvalidOption

RIEMANN = "riemann"
MIDPOINT = "midpoint"
TRAPEZOID = "trapezoid"
GAUSS_LEGENDRE = "gauss-legendre"
CLENSHAW_CURTIS = "clenshaw-curtis"

RULES: tuple[str, ...] = (RIEMANN, MIDPOINT, TRAPEZOID, GAUSS_LEGENDRE, CLENSHAW_CURTIS)
DEFAULT_RULE = RIEMANN  # the reference's sum; the accuracy it buys is in docs/method.md
# Rules whose points at N = 2^k + 1 contain those at 2^(k−1) + 1: a tolerance refines by doubling.
NESTED_RULES: tuple[str, ...] = (TRAPEZOID, CLENSHAW_CURTIS)
DEFAULT_NESTED_RULE = CLENSHAW_CURTIS
# A tolerance starts at 3 points and stops at this many, whether or not the estimate is below it.
TOLERANCE_START_POINTS = 3
TOLERANCE_MAX_POINTS = 65


@dataclass(frozen=True)
class Rule:
    """Points α (float64, (N,)) and their weights; ``weights`` ``None``: equal weights, the mean."""

    points: Tensor
    weights: Tensor | None

    def __len__(self) -> int:
        return len(self.points)


def check_rule(name: str) -> str:
    if name not in RULES:
        raise InvalidOption(f"quadrature must be one of {', '.join(RULES)}, got {name!r}")
    return name


def check_integration(quadrature: str | None, steps: int, tolerance: float | None) -> str:
    """The rule an explanation uses, after checking the three options together; raises InvalidOption.

    ``quadrature`` ``None``: :data:`DEFAULT_RULE`, or with a tolerance :data:`DEFAULT_NESTED_RULE`.
    ``steps`` is the number of points per tower, unused with a tolerance.
    """
    if tolerance is not None and (
        isinstance(tolerance, bool) or not isinstance(tolerance, float | int) or not 0 < tolerance < 1
    ):
        raise InvalidOption(f"tolerance must be a number in (0, 1), got {tolerance!r}")
    rule = check_rule(quadrature or (DEFAULT_RULE if tolerance is None else DEFAULT_NESTED_RULE))
    if tolerance is not None and rule not in NESTED_RULES:
        raise InvalidOption(f"a tolerance needs a nested rule ({', '.join(NESTED_RULES)}), not {rule!r}")
    if tolerance is None and steps < min_points(rule):
        raise InvalidOption(f"the {rule} rule needs at least {min_points(rule)} points, got {steps}")
    return rule


def min_points(name: str) -> int:
    """Endpoint rules need both ends."""
    return 2 if name in (TRAPEZOID, CLENSHAW_CURTIS) else 1


def quadrature_rule(name: str, n: int) -> Rule:
    """The rule ``name`` with ``n`` points on [0, 1]."""
    check_rule(name)
    if n < min_points(name):
        raise InvalidOption(f"the {name} rule needs at least {min_points(name)} points, got {n}")
    if name == RIEMANN:
        return Rule(right_riemann_points(n), None)
    if name == MIDPOINT:
        return Rule((torch.arange(n, dtype=torch.float64) + 0.5) / n, None)
    if name == TRAPEZOID:
        weights = torch.full((n,), 1.0 / (n - 1), dtype=torch.float64)
        weights[0] = weights[-1] = 0.5 / (n - 1)
        return Rule(torch.arange(n, dtype=torch.float64) / (n - 1), weights)
    if name == GAUSS_LEGENDRE:
        return _gauss_legendre(n)
    return _clenshaw_curtis(n)


def right_riemann_points(n: int) -> Tensor:
    """α ∈ {1, 1 − 1/N, …, 1/N}: the input is included, the reference is not.

    The reference computes these with a float ``arange`` that yields N + 1 points for some N (49, for
    one); here there are always exactly N.
    """
    return 1.0 - torch.arange(n, dtype=torch.float64) / n


def nested_sizes(start: int = TOLERANCE_START_POINTS, stop: int = TOLERANCE_MAX_POINTS) -> list[int]:
    """N = 2^k + 1 from ``start`` to ``stop``: each level's points contain the previous level's."""
    sizes = [start]
    while 2 * sizes[-1] - 1 <= stop:
        sizes.append(2 * sizes[-1] - 1)
    return sizes


def point_key(alpha: float) -> float:
    """A point's identity across nested levels (their formulas agree to the last bit or two)."""
    return round(alpha, 12)


def _gauss_legendre(n: int) -> Rule:
    """Golub–Welsch: the nodes are the eigenvalues of the Jacobi matrix of the Legendre polynomials."""
    k = torch.arange(1, n, dtype=torch.float64)
    off = k / torch.sqrt(4 * k * k - 1)
    jacobi = torch.diag(off, 1) + torch.diag(off, -1)
    nodes, vectors = torch.linalg.eigh(jacobi)
    weights = 2 * vectors[0] ** 2
    return Rule((nodes + 1) / 2, weights / 2)


def _clenshaw_curtis(n: int) -> Rule:
    """Nodes (1 − cos(kπ/(N−1)))/2, weights from the cosine series (exact for degree N − 1)."""
    m = n - 1
    theta = torch.tensor([k * math.pi / m for k in range(n)], dtype=torch.float64)
    weights = torch.ones(n, dtype=torch.float64)
    for j in range(1, m // 2 + 1):
        b = 1.0 if 2 * j == m else 2.0
        weights -= b * torch.cos(2 * j * theta) / (4 * j * j - 1)
    weights *= 2.0 / m
    weights[0] /= 2
    weights[-1] /= 2
    return Rule((1 - torch.cos(theta)) / 2, weights / 2)
