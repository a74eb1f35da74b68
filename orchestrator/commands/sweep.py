"""`pretrain sweep sweep.yaml [key=value ...] [--address URL] [--fit-only]`: train a grid of small models on Ray and
fit the scaling law L(N, D) = E + A/N^α + B/D^β to their validation losses (see orchestrator/planner/sweep.py)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="sweep config YAML (see examples/sweep-demo.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. tokens=1e5,3e5 cpus_per_run=0.5")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: a local cluster)")
    parser.add_argument("--fit-only", action="store_true", help="refit and redraw from results.jsonl, train nothing")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from orchestrator.planner.sweep import load_sweep, read_results, run_sweep, summarize

    config = load_sweep(args.config, args.overrides)
    if args.fit_only:
        summarize(config, read_results(Path(config.output) / "results.jsonl"))
    else:
        run_sweep(config, address=args.address)
    print(f"fit: {config.output}/fit.json, plot: {config.output}/scaling.png")
    return 0
