"""`pretrain profile` on a running 2-rank CPU job (torchrun): one readable trace per rank, and the job goes on to
finish; the same run's `profile.at_step` is written too. Wrong input is one readable line and exit code 2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from orchestrator.cli import main
from tests.helpers import REPO, TINY_RUN, torchrun
from tests.shards import write_shards

STEPS = 100


def test_a_running_job_is_profiled_on_every_rank_and_goes_on(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    shards = write_shards(tmp_path / "shards", seq_len=64, rows=400)
    checkpoints = tmp_path / "ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "TMPDIR": str(tmp_path),
           "PYTHONPATH": str(REPO)}
    cmd = [*torchrun(2), "-m", "orchestrator.cli", "train", str(REPO / "examples" / "tiny.yaml"),
           *TINY_RUN, f"data.path={shards}", f"checkpoint.dir={checkpoints}", "parallel.backend=native",
           f"schedule.steps={STEPS}", "schedule.eval_every=0", "checkpoint.every=0", "schedule.log_every=1000",
           "profile.at_step=2", "profile.steps=1"]
    job = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        history = checkpoints / "history.jsonl"
        deadline = time.monotonic() + 120
        while not (history.exists() and history.read_text()):  # training is under way
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0][-3000:]
            time.sleep(0.2)
        assert main(["profile", "--checkpoint-dir", str(checkpoints), "--steps", "2", "--timeout", "120"]) == 0
        output = job.communicate(timeout=180)[0]
    finally:
        job.kill()
    assert job.returncode == 0, output[-3000:]
    assert f"finished step {STEPS}" in output

    records = sorted((json.loads(p.read_text()) for p in (checkpoints / "profiles").glob("step_*/done.json")),
                     key=lambda r: r["step"])
    fixed, record = records  # the spec's profile.at_step, and the one asked for
    assert (fixed["step"], fixed["steps"], fixed["id"]) == (2, 1, "")
    assert 2 < record["step"] < STEPS and record["steps"] == 2
    for done in records:
        assert sorted(Path(f).name for f in done["files"]) == ["rank_0.json", "rank_1.json"]
    for path in fixed["files"] + record["files"]:
        trace = json.loads(Path(path).read_text())
        names = {event.get("name", "") for event in trace["traceEvents"]}
        assert any("aten::" in name for name in names)  # the step's operators, not an empty trace
    printed = capsys.readouterr().out
    assert f"profiled steps {record['step']} to {record['step'] + 1}:" in printed
    assert all(path in printed for path in record["files"])
    assert not (checkpoints / "profiles" / "request.json").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["profile", "--steps", "2"], "which run\\? give the job id"),
    (["profile", "--checkpoint-dir", "/nonexistent/ckpt"], "--checkpoint-dir '/nonexistent/ckpt': no such directory"),
    (["profile", "--checkpoint-dir", "s3://bucket/ckpt"], "is remote: profiles are written beside checkpoints"),
    (["profile", "--steps", "0", "--checkpoint-dir", "."], "--steps: got 0, allowed 1 to 1000"),
])
def test_wrong_input_is_one_line_and_exit_code_2(argv, message, capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert re.search(message, err), err


def test_a_run_that_never_takes_the_request_times_out_and_withdraws_it(tmp_path: Path, capsys) -> None:
    assert main(["profile", "--checkpoint-dir", str(tmp_path), "--timeout", "0.2"]) == 1
    assert "the run did not take the request within 0.2 s" in capsys.readouterr().err
    assert not (tmp_path / "profiles" / "request.json").exists()
