"""DCP checkpoints of the native backend: saved in the background while training goes on, resumed exactly in the same
layout, and resharded on load into other layouts (FSDP → tensor parallel, FSDP → pipeline × FSDP)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from native_resume_worker import SAVE_AT

from tests.helpers import PARAM_ATOL, REPO, RTOL, torchrun

WORKER = Path(__file__).with_name("native_resume_worker.py")

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("native-checkpoint")]


def launch(mode: str, procs: int, ckpt: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "TMPDIR": str(out.parent),
           "PYTHONPATH": str(REPO)}
    cmd = [*torchrun(procs), str(WORKER), mode, str(out), str(ckpt), *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def run(mode: str, procs: int, ckpt: Path, out: Path, *overrides: str) -> dict:
    done = launch(mode, procs, ckpt, out, *overrides)
    assert done.returncode == 0 and out.exists(), done.stdout[-3000:] + done.stderr[-6000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, dict]:
    """dp2 with FSDP resharding after forward: 10 steps, a checkpoint written in the background after step 5."""
    tmp = tmp_path_factory.mktemp("native-ckpt")
    straight = run("save", 2, tmp / "ckpt", tmp / "straight.pt", "parallel.zero_stage=3")
    assert sorted(p.name for p in (tmp / "ckpt").iterdir()) == ["dcp", "engine_state.pt"]
    return tmp / "ckpt", straight


def test_resumes_exactly_in_the_same_layout(saved, tmp_path):
    ckpt, straight = saved
    resumed = run("load", 2, ckpt, tmp_path / "resumed.pt", "parallel.zero_stage=3")
    assert resumed["client_state"] == {"step": SAVE_AT}
    assert resumed["losses"] == {s: v for s, v in straight["losses"].items() if s >= SAVE_AT}
    assert resumed["lr"] == straight["lr"]
    for name, value in straight["params"].items():
        assert torch.equal(resumed["params"][name], value), name


@pytest.mark.parametrize("procs,layout", [
    (2, ("parallel.tp=2", "parallel.sequence_parallel=true")),
    (4, ("parallel.pp=2", "parallel.zero_stage=2")),
], ids=["tp2", "dp2xpp2"])
def test_reshards_into_another_layout(saved, tmp_path, procs, layout):
    ckpt, straight = saved
    resumed = run("load", procs, ckpt, tmp_path / "resumed.pt", *layout)
    expected = {s: v for s, v in straight["losses"].items() if s >= SAVE_AT}
    assert resumed["losses"].keys() == expected.keys()
    for step, loss in resumed["losses"].items():
        assert loss == pytest.approx(expected[step], rel=RTOL), step
    for name, value in straight["params"].items():
        torch.testing.assert_close(resumed["params"][name], value, rtol=0, atol=PARAM_ATOL)


def test_a_missing_checkpoint_is_named(tmp_path):
    done = launch("load", 1, tmp_path / "nowhere", tmp_path / "out.pt")
    assert done.returncode != 0
    assert f"{tmp_path / 'nowhere'}: no native checkpoint (dcp/ and engine_state.pt) to load" in done.stderr
