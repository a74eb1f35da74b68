"""The main job end to end on one machine: `make demo` runs this.

It validates the demo spec; the later stages (prep, submit, report, samples) join it as they land.
"""

from __future__ import annotations

import sys
from pathlib import Path

from orchestrator.cli import main as pretrain

EXAMPLES = Path(__file__).resolve().parent


def main() -> int:
    return pretrain(["validate", str(EXAMPLES / "tiny.yaml")])


if __name__ == "__main__":
    sys.exit(main())
