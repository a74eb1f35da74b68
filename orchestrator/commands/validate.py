"""`pretrain validate job.yaml [section.key=value ...]`: report every problem at once, or print the resolved spec."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="job spec YAML")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument("--require-data", action="store_true", help="also require data.path to hold prepared shards")


def run(args: argparse.Namespace) -> int:
    from orchestrator.spec import spec_to_yaml
    from orchestrator.validate import load_spec

    spec = load_spec(args.spec, args.overrides, require_data=args.require_data)
    print(spec_to_yaml(spec), end="")
    return 0
