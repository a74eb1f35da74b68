"""`pretrain prep prep.yaml [key=value ...] [--address URL]`: corpora → deduplicated, filtered, mixed, tokenized
Arrow shards (see dataprep/pipeline.py). Runs on an embedded local Ray unless --address names a cluster; a rerun
with the same inputs and config resumes where the last one stopped."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="prep config YAML (see examples/prep-demo.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seq_len=512 sources.kjv.share=0.2")
    parser.add_argument("--address", default=None, help="Ray cluster address (ray://host:10001 or auto)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or report table")


def run(args: argparse.Namespace) -> int:
    from dataprep.config import load_prep_config
    from dataprep.pipeline import run_prep

    config = load_prep_config(args.config, args.overrides)
    report = run_prep(config, address=args.address, progress=not args.quiet)
    if not args.quiet:
        print(f"wrote {report['totals']['train_rows']:,} train rows to {config.output} "
              f"(report: {config.output}/report.json, report.png)")
    return 0
