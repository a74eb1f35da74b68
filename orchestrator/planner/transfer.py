"""Hyperparameter transfer in `pretrain sweep`: tune the learning rate (and init scale) small, train large with it.

    pretrain sweep examples/transfer-demo.yaml        (a sweep config with a `transfer:` section)

With `transfer.lrs` set, the sweep trains every learning rate × init_std of the grid at the first of `sizes` (the
base width), picks the setting of the lowest final validation loss, and trains each larger size of `sizes` with it:
under `transfer.parametrization: mup` (`parallel.mup`, base width = the first size's dim) that setting is meant to
stay (near) the best at every width; under `standard` the best learning rate shrinks as the model widens, which is
what the comparison shows. Every run is the sweep's usual one (the real loop, a Ray task, a line of results.jsonl,
here with its lr and init_std); `transfer.json` holds the grid's losses, the choice and the larger runs', and
`coord_check.png` the coordinate check of both parametrizations at the chosen setting
(`orchestrator.planner.mup_check`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.config_parser import setting
from orchestrator.errors import Problem, SpecError

if TYPE_CHECKING:
    from orchestrator.planner.sweep import RunPlan, SweepConfig


@dataclass
class TransferConfig:
    """The `transfer:` section of a sweep config."""

    lrs: str = setting("", "learning rates (optim.lr) tried at the first of `sizes`, comma-separated; set, the sweep "
                       "transfers hyperparameters instead of fitting the scaling grid, each run training on the "
                       "first of `tokens`")
    init_stds: str = setting("", "model.init_std values tried with each learning rate; empty: the base spec's")
    parametrization: str = setting("mup", "how the chosen setting is carried to the larger sizes: mup (base width "
                                   "= the first size's dim) or standard, to compare", choices=("standard", "mup"))
    coord_check_steps: int = setting(10, "steps each width trains in the coordinate check drawn to "
                                     "coord_check.png (both parametrizations, the chosen setting); 0: none",
                                     min=0, max=10_000)


def transfer_grid(config: SweepConfig, problems: list[Problem]) -> tuple[list[float], list[float | None]]:
    """The learning rates and init stds to try (None: the base spec's init_std), their problems added."""
    from orchestrator.planner.sweep import _parse_numbers

    t = config.transfer
    lrs = _parse_numbers("transfer.lrs", t.lrs, problems)
    return lrs, (_parse_numbers("transfer.init_stds", t.init_stds, problems) if t.init_stds else [None])


def plan_transfer(config: SweepConfig, best: dict[str, float] | None = None) -> list[RunPlan]:
    """The grid at the base size, or (given the chosen `best` lr and init_std) the larger sizes' runs."""
    from orchestrator.planner.sweep import _grid, plan_run
    from orchestrator.validate import load_spec

    t = config.transfer
    problems: list[Problem] = []
    sizes, budgets = _grid(config, problems)
    lrs, stds = transfer_grid(config, problems)
    if problems:
        raise SpecError("sweep", problems)
    (base_dim, base_layers), tokens = sizes[0], budgets[0]
    optim = load_spec(config.base).optim
    floor = optim.min_lr / optim.lr if optim.lr else 0.0  # each run decays to the base spec's share of its peak
    mup = [f"model.parametrization={t.parametrization}",
           f"model.mup_base_dim={base_dim if t.parametrization == 'mup' else 0}"]
    if best is None:
        points = [(base_dim, base_layers, lr, std) for lr in lrs for std in stds]
    else:
        points = [(dim, layers, best["lr"], best["init_std"]) for dim, layers in sizes[1:]]
    runs = []
    for dim, layers, lr, std in points:
        std_name = f"-std{std:g}" if std is not None else ""
        name = f"{config.name}-{t.parametrization}-d{dim}-l{layers}-lr{lr:g}{std_name}"
        extra = (*mup, f"optim.lr={lr}", f"optim.min_lr={lr * floor}",
                 *([f"model.init_std={std}"] if std is not None else []))
        run = plan_run(config, name, dim, layers, tokens, extra, problems)
        if run is not None:
            runs.append(run)
    if problems:
        raise SpecError("sweep", problems)
    return runs


def run_transfer(config: SweepConfig, address: str | None = None, log=print) -> dict[str, Any]:
    """Train the grid, choose, train the larger sizes with the choice; write transfer.json (and coord_check.png)."""
    from orchestrator.planner.sweep import results_of, train_missing

    grid = plan_transfer(config)
    train_missing(config, grid, address, log)
    best = choose(results_of(config, grid))
    log(f"best at d{grid[0].dim}: lr {best['lr']:g}, init_std {best['init_std']:g} "
        f"(validation loss {best['val_loss']:.4f}); training the larger sizes with it")
    train_missing(config, plan_transfer(config, best), address, log)
    return summarize_transfer(config, log)


def choose(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The grid run of the lowest final validation loss (a diverged run, NaN or never evaluated, never wins)."""
    finished = [r for r in results if isinstance(r.get("val_loss"), float) and math.isfinite(r["val_loss"])]
    if not finished:
        raise SpecError("sweep", [Problem("transfer.lrs", "no run of the grid finished with a validation loss "
                                          "(every learning rate diverged or failed); try smaller ones")])
    return min(finished, key=lambda r: r["val_loss"])


def summarize_transfer(config: SweepConfig, log=print) -> dict[str, Any]:
    """transfer.json and the printed table from results.jsonl; the coordinate check's PNG when asked for."""
    from orchestrator.planner.sweep import results_of

    keys = ("name", "dim", "n_layers", "lr", "init_std", "params", "tokens", "val_loss")
    grid = plan_transfer(config)
    grid_results = results_of(config, grid)
    best = choose(grid_results)
    larger = plan_transfer(config, best)
    summary: dict[str, Any] = {
        "parametrization": config.transfer.parametrization, "base_dim": grid[0].dim,
        "grid": [{k: r.get(k) for k in keys} for r in grid_results],
        "best": {k: best.get(k) for k in keys},
        "transferred": [{k: r.get(k) for k in keys} for r in results_of(config, larger)],
    }
    log(f"{'run':<48} {'lr':>9} {'init_std':>9} {'val loss':>9}")
    for r in summary["grid"] + summary["transferred"]:
        loss = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
        mark = " ← best" if r["name"] == best["name"] else ""
        log(f"{r['name']:<48} {r['lr']:>9.3g} {r['init_std']:>9.3g} {loss:>9}{mark}")
    out = Path(config.output)
    if config.transfer.coord_check_steps:
        summary["coord_check"] = draw_coord_check(config, grid[0], best, out / "coord_check.png")
        log("coordinate check (max/min activation RMS over widths): " + ", ".join(
            f"{p} {max(s.values()):.2f}×" for p, s in summary["coord_check"].items()))
    with open(out / "transfer.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary


def draw_coord_check(config: SweepConfig, base: RunPlan, best: dict[str, Any], path: Path) -> dict[str, dict]:
    """Both parametrizations' coordinate checks at the sweep's widths with the chosen setting; per layer, the
    max/min RMS ratio over widths of each."""
    from orchestrator.planner.mup_check import coord_check, plot_coord_check, spread
    from orchestrator.planner.sweep import _parse_sizes
    from orchestrator.validate import load_spec

    widths = sorted({dim for dim, _ in _parse_sizes(config, [])})
    checks = {}
    for parametrization in ("standard", "mup"):
        mup = [f"model.parametrization={parametrization}",
               f"model.mup_base_dim={base.dim if parametrization == 'mup' else 0}"]
        spec = load_spec(config.base, [*base.overrides, *mup, f"optim.lr={best['lr']}",
                                       f"model.init_std={best['init_std']}"], require_data=True)
        checks[parametrization] = coord_check(spec, widths, config.transfer.coord_check_steps, config.head_dim)
    plot_coord_check(path, checks, title=f"{config.name}: coordinate check, lr {best['lr']:g}, "
                     f"{config.transfer.coord_check_steps} steps")
    return {p: spread(rms) for p, rms in checks.items()}
