"""What the job commands (status, logs, stop, list) share: the `--address` of the cluster's Jobs API."""

from __future__ import annotations

import argparse
import os

from orchestrator.errors import UserError

ADDRESS_VARIABLES = ("PRETRAIN_ADDRESS", "RAY_API_SERVER_ADDRESS")


def add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="the cluster's Jobs API, e.g. http://head:8265 "
                        f"(default: ${ADDRESS_VARIABLES[0]} or ${ADDRESS_VARIABLES[1]})")


def address(args: argparse.Namespace) -> str:
    found = args.address or next((os.environ[v] for v in ADDRESS_VARIABLES if os.environ.get(v)), "")
    if not found:
        raise UserError(f"no cluster address: pass --address http://HEAD:8265 or set ${ADDRESS_VARIABLES[0]} "
                        "(runs started without --address live only as long as their `pretrain submit`)")
    return found
