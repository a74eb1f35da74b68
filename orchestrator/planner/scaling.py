"""Scaling laws: how big a model a compute budget should buy, and how good it will be.

Two answers, as in Hoffmann et al. (2022, "Chinchilla"):

- the rule of thumb: training FLOPs C ≈ 6·N·D, compute-optimal at about 20 tokens per parameter;
- a fitted law L(N, D) = E + A/N^α + B/D^β (approach 3): a Huber loss (δ = 1e-3) on the log of the predicted
  loss, written as a log-sum-exp of (log A − α log N, log B − β log D, log E), minimised with L-BFGS from a grid of
  initialisations (the paper's grid), keeping the best. Its compute-optimal frontier is
  N_opt = G·(C/6)^(β/(α+β)), D_opt = (C/6)^(α/(α+β)) / G, with G = (αA / (βB))^(1/(α+β)).

The IsoFLOP view (approach 2) reads the same runs along curves of constant C = 6·N·D.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from orchestrator.errors import UserError

TOKENS_PER_PARAM = 20.0
HUBER_DELTA = 1e-3
# Chinchilla's initialisation grid: α, β ∈ {0, 0.5, …, 2}, e ∈ {−1, −0.5, …, 1}, a, b ∈ {0, 5, …, 25}.
GRID_EXPONENTS = (0.0, 0.5, 1.0, 1.5, 2.0)
GRID_E = (-1.0, -0.5, 0.0, 0.5, 1.0)
GRID_AB = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)


@dataclass(frozen=True)
class ScalingLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta, N parameters and D training tokens."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n: float | np.ndarray, d: float | np.ndarray) -> float | np.ndarray:
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    def compute_optimal(self, flops: float) -> tuple[float, float]:
        """(N, D) minimising the loss at C = 6·N·D."""
        a, b = self.alpha, self.beta
        g = (a * self.A / (b * self.B)) ** (1 / (a + b))
        return g * (flops / 6) ** (b / (a + b)), (flops / 6) ** (a / (a + b)) / g


# Chinchilla's own fit (approach 3), the default law before a sweep of one's own.
CHINCHILLA = ScalingLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


@dataclass(frozen=True)
class TokenLaw:
    """L(D) = E + B / D^β: loss against training tokens at one model size, the A/N^α term folded into E.

    What WSD branches give: several token budgets of one model (`orchestrator.planner.wsd`)."""

    E: float
    B: float
    beta: float

    def loss(self, d: float | np.ndarray) -> float | np.ndarray:
        return self.E + self.B / np.power(d, self.beta)


def fit_token_law(tokens: Sequence[float], losses: Sequence[float]) -> TokenLaw:
    """Least-squares L(D) = E + B/D^β through (tokens, loss) points of one model size.

    For a fixed β the law is linear in (E, B), solved by non-negative least squares (a loss floor below zero or a
    loss rising with data is no law); β (in (0, 3]) is the best of a grid, refined by a bounded 1-D search around it.
    Three points of distinct token counts determine the three numbers where such a law passes through them; short
    runs, whose loss still falls faster than any power of D, get E = 0 and the closest pure power law.
    """
    from scipy.optimize import minimize_scalar, nnls

    d, y = np.asarray(tokens, dtype=float), np.asarray(losses, dtype=float)
    if len(d) != len(y) or len(np.unique(d)) < 3 or not (np.all(np.isfinite(y)) and np.all(d > 0)):
        raise UserError(f"a loss-vs-tokens fit needs at least 3 distinct positive token counts with finite losses; "
                        f"got {len(np.unique(d))} distinct of {len(d)}")
    scale = float(np.exp(np.mean(np.log(d))))  # D / its geometric mean keeps D^-β near 1 for every β

    def solve(beta: float) -> tuple[float, np.ndarray]:
        design = np.stack([np.ones_like(d), (d / scale) ** -beta], axis=1)
        coef, norm = nnls(design, y)
        return float(norm**2), coef

    grid = np.linspace(0.01, 3.0, 300)
    i = int(np.argmin([solve(b)[0] for b in grid]))
    step = grid[1] - grid[0]
    best = minimize_scalar(lambda b: solve(b)[0], bounds=(max(1e-3, grid[i] - step), grid[i] + step),
                           method="bounded", options={"xatol": 1e-9})
    beta = float(best.x)
    e, b = solve(beta)[1]
    return TokenLaw(E=float(e), B=float(b) * scale**beta, beta=beta)


def chinchilla_optimal(flops: float) -> tuple[float, float]:
    """(N, D) by the 20-tokens-per-parameter rule: C = 6·N·(20·N)."""
    n = math.sqrt(flops / (6 * TOKENS_PER_PARAM))
    return n, TOKENS_PER_PARAM * n


def gpu_hours_to_flops(gpu_hours: float, peak_flops: float = 989e12, mfu: float = 0.4) -> float:
    """Training FLOPs a budget of GPU-hours buys at a given model-FLOP utilisation."""
    if gpu_hours <= 0 or not 0 < mfu <= 1:
        raise UserError(f"a GPU-hour budget must be positive and MFU in (0, 1]; got {gpu_hours} h at MFU {mfu}")
    return gpu_hours * 3600 * peak_flops * mfu


def fit_scaling_law(params: Sequence[float], tokens: Sequence[float], losses: Sequence[float], *,
                    top_starts: int = 64) -> ScalingLaw:
    """Fit L(N, D) to runs of N parameters trained on D tokens reaching `losses`.

    The whole initialisation grid (4,500 points) is scored, and L-BFGS runs from the `top_starts` best of them:
    the starts that lose are far from any minimum the others reach.
    """
    from scipy.optimize import minimize
    from threadpoolctl import threadpool_limits

    log_n, log_d, log_l = (np.log(np.asarray(x, dtype=float)) for x in (params, tokens, losses))
    if not (len(log_n) == len(log_d) == len(log_l)) or len(log_l) < 5:
        raise UserError(f"a scaling-law fit needs at least 5 runs (N, D, loss) of equal length; got {len(log_l)}")
    if not np.all(np.isfinite(log_l)):
        raise UserError("a scaling-law fit needs positive, finite losses; some runs diverged or did not finish")

    def residuals(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """log L̂ − log L for parameter rows x = (a, b, e, α, β), and each term's share of L̂."""
        a, b, e, alpha, beta = (x[..., i, None] for i in range(5))
        terms = np.stack(np.broadcast_arrays(a - alpha * log_n, b - beta * log_d, e + 0 * log_n))
        top = terms.max(axis=0)
        weights = np.exp(terms - top)
        total = weights.sum(axis=0)
        return top + np.log(total) - log_l, weights / total

    def huber(r: np.ndarray) -> np.ndarray:
        small = np.abs(r) <= HUBER_DELTA
        return np.where(small, 0.5 * r**2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA)).sum(axis=-1)

    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        r, share = residuals(x)
        slope = np.clip(r, -HUBER_DELTA, HUBER_DELTA)  # the Huber loss's derivative
        grad = np.array([(slope * share[0]).sum(), (slope * share[1]).sum(), (slope * share[2]).sum(),
                         -(slope * share[0] * log_n).sum(), -(slope * share[1] * log_d).sum()])
        return float(huber(r)), grad

    grid = np.array([(a, b, e, alpha, beta) for alpha, beta, e, a, b in
                     itertools.product(GRID_EXPONENTS, GRID_EXPONENTS, GRID_E, GRID_AB, GRID_AB)])
    scores = huber(residuals(grid)[0])
    best = None
    with threadpool_limits(1):  # five-parameter problems: BLAS threads only spin against each other
        for start in grid[np.argsort(scores)[:top_starts]]:
            result = minimize(objective, start, jac=True, method="L-BFGS-B")
            if best is None or result.fun < best.fun:
                best = result
    a, b, e, alpha, beta = best.x
    return ScalingLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha), beta=float(beta))


def isoflop_minima(params: Sequence[float], tokens: Sequence[float], losses: Sequence[float],
                   rel_tol: float = 0.25) -> list[tuple[float, float, float]]:
    """(C, N at the lowest loss, that loss) for runs grouped by compute C = 6·N·D within `rel_tol`.

    A parabola in log N through each group's points (three or more) gives the minimum between the sizes tried.
    """
    runs = sorted(zip((6 * n * d for n, d in zip(params, tokens, strict=True)), params, losses, strict=True))
    groups: list[list[tuple[float, float, float]]] = []
    for run in runs:
        if groups and run[0] <= groups[-1][0][0] * (1 + rel_tol):
            groups[-1].append(run)
        else:
            groups.append([run])
    minima = []
    for group in groups:
        flops = float(np.exp(np.mean([np.log(c) for c, _, _ in group])))
        x = np.log([n for _, n, _ in group])
        y = np.array([loss for _, _, loss in group])
        if len(group) >= 3 and len(set(x)) >= 3:
            c2, c1, c0 = np.polyfit(x, y, 2)
            if c2 > 0 and x.min() <= -c1 / (2 * c2) <= x.max():
                vertex = -c1 / (2 * c2)
                minima.append((flops, float(np.exp(vertex)), float(c0 + c1 * vertex + c2 * vertex**2)))
                continue
        i = int(np.argmin(y))
        minima.append((flops, float(np.exp(x[i])), float(y[i])))
    return minima
