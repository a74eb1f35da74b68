"""`pretrain sweep sweep.yaml [key=value ...] [--address URL] [--fit-only]`: train a grid of small models on Ray and
fit the scaling law L(N, D) = E + A/N^α + B/D^β to their validation losses (see orchestrator/planner/sweep.py), or,
with a `transfer:` section, tune the learning rate at the smallest size and carry it to the larger ones under μP
(orchestrator/planner/transfer.py)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="sweep config YAML (see examples/sweep-demo.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. tokens=1e5,3e5 cpus_per_run=0.5")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: a local cluster)")
    parser.add_argument("--fit-only", action="store_true",
                        help="refit and redraw (a transfer: choose and redraw) from results.jsonl, train nothing")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from orchestrator.planner.sweep import load_sweep, read_results, run_sweep, summarize

    config = load_sweep(args.config, args.overrides)
    if config.transfer.lrs:
        from orchestrator.planner.transfer import summarize_transfer

        if args.fit_only:
            summarize_transfer(config)
        else:
            run_sweep(config, address=args.address)
        plot = f", coordinate check: {config.output}/coord_check.png" if config.transfer.coord_check_steps else ""
        print(f"transfer: {config.output}/transfer.json{plot}")
        return 0
    if args.fit_only:
        summarize(config, read_results(Path(config.output) / "results.jsonl"))
    else:
        run_sweep(config, address=args.address)
    print(f"fit: {config.output}/fit.json, plot: {config.output}/scaling.png")
    return 0
