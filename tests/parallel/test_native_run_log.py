"""A native-backend run on CPU needs no DeepSpeed and prints only its own lines: it trains, checkpoints and resumes
with DeepSpeed unimportable, and its log holds no DeepSpeed line, no warning raised in third-party code and no MFU
figure (a CPU's peak FLOP/s is unknown)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import TINY_RUN, losses, torchrun
from tests.shards import write_shards

REPO = Path(__file__).resolve().parents[2]
# "path/to/file.py:12: FutureWarning: ..." as the warnings module prints it
WARNING_LINE = re.compile(r"^(?:\[rank\d+\]:)?(?P<file>\S+?):\d+: (?P<category>\w*Warning):", re.MULTILINE)


def train(tmp: Path, blocker: Path, *overrides: str) -> str:
    """`pretrain train` on 2 ranks under torchrun with the blocker first on PYTHONPATH; its stdout and stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "TMPDIR": str(tmp),
           "PYTHONPATH": os.pathsep.join((str(blocker), str(REPO)))}
    cmd = [*torchrun(2), "-m", "orchestrator.cli", "train", str(REPO / "examples" / "tiny.yaml"),
           *TINY_RUN, "parallel.backend=native", "checkpoint.async_save=true", "checkpoint.every=2", *overrides]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    return log


def assert_own_lines_only(log: str) -> None:
    assert not [line for line in log.splitlines() if "deepspeed" in line.lower()]
    third_party = [m.group(0) for m in WARNING_LINE.finditer(log) if not m.group("file").startswith(str(REPO) + "/")
                   or m.group("file").startswith(str(REPO / ".venv"))]
    assert not third_party, third_party
    assert "mfu" not in log.lower()


@pytest.mark.slow
def test_native_cpu_run_saves_resumes_and_logs_only_its_own_lines(tmp_path: Path) -> None:
    blocker = tmp_path / "blocked"
    (blocker / "deepspeed").mkdir(parents=True)
    (blocker / "deepspeed" / "__init__.py").write_text('raise ImportError("blocked for this test")\n')
    probe = subprocess.run([sys.executable, "-c", "import deepspeed"], env={**os.environ, "PYTHONPATH": str(blocker)},
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "blocked for this test" in probe.stderr  # the blocker is what Python finds

    common = (f"data.path={write_shards(tmp_path / 'shards', seq_len=64, rows=200)}",
              f"checkpoint.dir={tmp_path / 'ckpt'}")
    first = train(tmp_path, blocker, *common, "schedule.steps=4")
    assert sorted(losses(first)) == [1, 2, 3, 4]
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_4"
    manifest = (tmp_path / "ckpt" / "step_4" / "manifest.json").read_text()
    assert "engine/dcp/.metadata" in manifest and "__1_0.distcp" in manifest and "rng/rank_00001.pt" in manifest

    second = train(tmp_path, blocker, *common, "schedule.steps=6")
    assert sorted(losses(second)) == [5, 6]
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_6"
    for log in (first, second):
        assert_own_lines_only(log)
