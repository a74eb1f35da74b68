"""The scaling-law figures: a sweep (loss against tokens per model size, and the IsoFLOP view, fit drawn through) and
WSD branches (one model's loss against tokens from one stable run and its decays)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from orchestrator.planner.scaling import ScalingLaw, TokenLaw


def plot_sweep(path: str | os.PathLike, params: Sequence[float], tokens: Sequence[float], losses: Sequence[float],
               law: ScalingLaw, title: str = "") -> None:
    """Write a two-panel PNG: measured losses with the fitted L(N, D), and loss against N at constant compute."""
    import matplotlib.ticker

    plt = _pyplot()

    params, tokens, losses = (np.asarray(x, dtype=float) for x in (params, tokens, losses))
    sizes = np.unique(params)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(sizes)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))

    d_grid = np.logspace(np.log10(tokens.min()) - 0.2, np.log10(tokens.max()) + 0.5, 100)
    for n, color in zip(sizes, colors, strict=True):
        mine = params == n
        left.scatter(tokens[mine], losses[mine], color=color, zorder=3, label=f"N = {n / 1e6:.2f}M")
        left.plot(d_grid, law.loss(n, d_grid), color=color, alpha=0.7)
    left.set(xscale="log", xlabel="training tokens D", ylabel="validation loss",
             title=f"fit: L = {law.E:.2f} + {law.A:.3g}/N^{law.alpha:.2f} + {law.B:.3g}/D^{law.beta:.2f}")
    left.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.legend(fontsize=8)

    compute = 6 * params * tokens
    budgets = np.logspace(np.log10(compute.min()), np.log10(compute.max()), 4)
    n_grid = np.logspace(np.log10(params.min()) - 0.5, np.log10(params.max()) + 0.5, 200)
    budget_colors = plt.cm.plasma(np.linspace(0, 0.8, len(budgets)))
    for c, color in zip(budgets, budget_colors, strict=True):
        right.plot(n_grid, law.loss(n_grid, c / (6 * n_grid)), color=color, label=f"C = {c:.2g} FLOPs")
        n_opt, d_opt = law.compute_optimal(c)
        right.scatter([n_opt], [law.loss(n_opt, d_opt)], color=color, marker="*", s=120, zorder=4)
    right.scatter(params, losses, c=np.log10(compute), cmap="plasma", edgecolors="k", zorder=3, label="runs")
    right.set(xscale="log", xlabel="parameters N", ylabel="loss", title="IsoFLOP curves of the fit (★ optimum)")
    right.set_ylim(losses.min() - 0.3, losses.max() + 0.3)
    right.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    _save(plt, fig, path)


def plot_branches(path: str | os.PathLike, stable: tuple[Sequence[float], Sequence[float]],
                  decays: Sequence[tuple[Sequence[float], Sequence[float]]], tokens: Sequence[float],
                  losses: Sequence[float], law: TokenLaw | None, title: str = "") -> None:
    """Write a PNG of WSD branches: the stable run's training loss, each branch's decay, the branches' final
    losses against their tokens and the L(D) fitted through them (none with fewer than three branches)."""
    plt = _pyplot()

    tokens, losses = np.asarray(tokens, dtype=float), np.asarray(losses, dtype=float)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.plot(*stable, color="0.6", linewidth=1, label="stable run (training loss)")
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(decays)))
    for (d, loss), color in zip(decays, colors, strict=True):
        ax.plot(d, loss, color=color, linewidth=1.2)
    ax.scatter(tokens, losses, color=colors, edgecolors="k", zorder=3, label="branch: final loss")
    if law is not None:
        grid = np.logspace(np.log10(tokens.min()) - 0.1, np.log10(tokens.max()) + 0.3, 100)
        ax.plot(grid, law.loss(grid), color="tab:red", linestyle="--",
                label=f"fit: L = {law.E:.3f} + {law.B:.3g}/D^{law.beta:.3f}")
    ax.set(xscale="log", xlabel="training tokens D", ylabel="loss")
    low, high = min(losses.min(), min(np.min(loss) for _, loss in decays)), losses.max()
    ax.set_ylim(low - 0.3 * (high - low + 0.1), high + 1.5 * (high - low + 0.1))
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    _save(plt, fig, path)


def _pyplot():
    """pyplot on the file-only Agg backend: the planner draws on machines without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str | os.PathLike) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
