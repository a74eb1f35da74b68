"""`pretrain prep prep.yaml [key=value ...] [--address URL]`: corpora → deduplicated, filtered, mixed, tokenized
Arrow shards (see dataprep/pipeline.py). Runs on an embedded local Ray unless --address names a cluster; a rerun
with the same inputs and config resumes where the last one stopped. `pretrain prep train-quality` trains the
classifier of `filters.quality` (orchestrator/commands/train_quality.py)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "pretrain prep train-quality --help: train a fastText quality classifier (filters.quality)"
    parser.add_argument("config", help="prep config YAML (see examples/prep-demo.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seq_len=512 sources.kjv.share=0.2")
    parser.add_argument("--address", default=None, help="Ray cluster address (ray://host:10001 or auto)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or report table")
    parser.add_argument("--metrics-port", type=int, default=0,
                        help="serve the job's Prometheus metrics on this port (0: a free one; -1: none)")
    parser.add_argument("--targets-file", help="advertise the metrics endpoint in this Prometheus file_sd file")


def run(args: argparse.Namespace) -> int:
    from cluster.local import apply_local_env

    apply_local_env()  # before Ray is imported: loopback only, no usage statistics, no auth token written
    from dataprep.config import load_prep_config
    from dataprep.pipeline import run_prep
    from dataprep.stats import PrepStats
    from orchestrator.errors import UserError

    if args.metrics_port < -1 or args.metrics_port > 65535:
        raise UserError(f"--metrics-port: got {args.metrics_port}, allowed: -1 (none), 0 (a free port) or 1-65535")
    config = load_prep_config(args.config, args.overrides)
    stats = PrepStats()
    exporter = None if args.metrics_port < 0 else _serve_metrics(config.name, stats, args)
    try:
        report = run_prep(config, address=args.address, stats=stats, progress=not args.quiet)
    finally:
        if exporter is not None:
            exporter.close()
    if not args.quiet:
        print(f"wrote {report['totals']['train_rows']:,} train rows to {config.output} "
              f"(report: {config.output}/report.json, report.png)")
    return 0


def _serve_metrics(run: str, stats, args: argparse.Namespace):
    from cluster.metrics import DataprepExporter, prep_stage_counts, write_targets_file

    exporter = DataprepExporter(run, poll=lambda: prep_stage_counts(stats.snapshot()), port=args.metrics_port)
    if args.targets_file:
        write_targets_file(args.targets_file, [{"targets": [exporter.target], "labels": {"run": run, "role": "prep"}}])
    if not args.quiet:
        print(f"prep metrics: http://{exporter.target}/metrics", flush=True)
    return exporter
