"""What the engine factory imports: DeepSpeed without MLflow (its autotuner's import of it is seconds of every rank's
start), and MLflow still importable afterwards for the mlflow tracker."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO

PROBE = """
import sys
from parallel.engine import deepspeed_engine_class
deepspeed_engine_class()
from deepspeed.autotuning import autotuner
print("deepspeed", "deepspeed" in sys.modules, "mlflow", "mlflow" in sys.modules, "autotuner", autotuner.has_mlflow)
import mlflow
print("then", mlflow.__name__)
"""


def test_the_deepspeed_engine_is_imported_without_mlflow_which_stays_importable() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[-3:] == ["deepspeed True mlflow False autotuner False", "then mlflow", ""]
