"""Scaling laws: the Chinchilla approach-3 fit recovers a known law from noisy runs; compute-optimal sizing."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.errors import UserError
from orchestrator.planner.scaling import (
    CHINCHILLA,
    ScalingLaw,
    chinchilla_optimal,
    fit_scaling_law,
    gpu_hours_to_flops,
    isoflop_minima,
)

KNOWN = ScalingLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


@pytest.mark.parametrize("seed", [0])
def test_fit_recovers_known_parameters_from_noisy_runs(seed):
    rng = np.random.default_rng(seed)
    n = np.repeat(np.logspace(7, 11, 9), 7)
    d = np.tile(np.logspace(8, 13, 7), 9)
    losses = KNOWN.loss(n, d) * np.exp(rng.normal(0.0, 1e-3, n.size))  # 0.1% noise on every loss
    law = fit_scaling_law(n, d, losses)
    for name in ("E", "A", "B", "alpha", "beta"):
        assert getattr(law, name) == pytest.approx(getattr(KNOWN, name), rel=0.05), name


def test_fit_is_robust_to_an_outlier():
    n = np.repeat(np.logspace(7, 10, 6), 6)
    d = np.tile(np.logspace(8.5, 12, 6), 6)
    losses = KNOWN.loss(n, d)
    losses[7] *= 1.5  # one diverged run
    law = fit_scaling_law(n, d, losses)
    assert law.alpha == pytest.approx(KNOWN.alpha, rel=0.02)
    assert abs(law.E / KNOWN.E - 1) < 0.02


def test_compute_optimal_minimises_the_loss_at_fixed_compute():
    flops = 1e21
    n_opt, d_opt = CHINCHILLA.compute_optimal(flops)
    assert 6 * n_opt * d_opt == pytest.approx(flops)
    sizes = n_opt * np.logspace(-0.5, 0.5, 101)
    losses = CHINCHILLA.loss(sizes, flops / (6 * sizes))
    assert sizes[np.argmin(losses)] == pytest.approx(n_opt, rel=0.03)


def test_rule_of_thumb_is_twenty_tokens_per_parameter():
    n, d = chinchilla_optimal(5.76e23)  # Gopher's budget
    assert d / n == pytest.approx(20) and 6 * n * d == pytest.approx(5.76e23)
    assert 60e9 < n < 80e9  # the paper's 67B-70B


def test_isoflop_minima_lie_on_the_laws_frontier():
    runs = []
    for flops in (1e18, 1e19, 1e20):
        n_opt, _ = KNOWN.compute_optimal(flops)
        for n in n_opt * np.logspace(-0.6, 0.6, 7):
            runs.append((n, flops / (6 * n), float(KNOWN.loss(n, flops / (6 * n)))))
    minima = isoflop_minima(*zip(*runs, strict=True))
    assert len(minima) == 3
    for flops, n_best, loss in minima:
        n_opt, d_opt = KNOWN.compute_optimal(flops)
        assert n_best == pytest.approx(n_opt, rel=0.15)
        assert loss == pytest.approx(float(KNOWN.loss(n_opt, d_opt)), rel=0.005)


def test_gpu_hours_become_flops():
    assert gpu_hours_to_flops(1000, peak_flops=989e12, mfu=0.4) == pytest.approx(1000 * 3600 * 989e12 * 0.4)
    with pytest.raises(UserError, match=r"a GPU-hour budget must be positive and MFU in \(0, 1\]; got -1 h"):
        gpu_hours_to_flops(-1)


@pytest.mark.parametrize(
    ("losses", "message"),
    [([3.0, 2.9, 2.8], r"a scaling-law fit needs at least 5 runs \(N, D, loss\) of equal length; got 3"),
     ([3.0, 2.9, float("nan"), 2.7, 2.6], r"a scaling-law fit needs positive, finite losses; some runs diverged")],
)
def test_bad_runs_are_refused(losses, message):
    count = len(losses)
    with pytest.raises(UserError, match=message):
        fit_scaling_law(np.logspace(6, 7, count), np.logspace(8, 9, count), losses)
