"""Kill real DeepSpeed runs (gloo, several processes) and resume them: exactly, at another layout, after a crash
in the middle of a save, and past a corrupt checkpoint file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from parallel.launch import open_store
from tests.shards import write_shards

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("resume_worker.py")

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("resume")]

SPEC = {
    "name": "resume",
    # the vocabulary pinned (not padded per tp) so that a resume at tp=2 keeps the model's shapes
    "model": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32, "vocab_size": 512},
    "data": {"seq_len": 32, "seed": 11, "prefetch": 2},
    "parallel": {"backend": "deepspeed", "zero_stage": 1, "micro_batch_size": 2, "grad_accum": 2,
                 "precision": "fp32"},
    "optim": {"lr": 3.0e-3, "min_lr": 3.0e-4},
    "schedule": {"steps": 20, "warmup_steps": 2, "eval_every": 0},
    "checkpoint": {"every": 10, "keep_last": 2},
    "resources": {"device": "cpu", "num_nodes": 1, "gpus_per_node": 2},
}


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    shards = write_shards(root / "shards", seq_len=32, rows=400)
    spec = {**SPEC, "data": {**SPEC["data"], "path": str(shards)}}
    (root / "job.yaml").write_text(yaml.safe_dump(spec))
    return root / "job.yaml"


def launch(job: Path, ranks: int, ckpt: Path, out: Path, *overrides: str, flags: tuple[str, ...] = ()) -> list[int]:
    """Start `ranks` worker processes (torchrun-style variables) and wait for all; returns their exit codes. Their
    group's store listens here from before the first rank starts (a port found free could be taken meanwhile)."""
    store = open_store()
    args = [sys.executable, str(WORKER), str(job), str(out), f"checkpoint.dir={ckpt}",
            f"resources.gpus_per_node={ranks}", *overrides, *flags]
    procs = []
    log = open(out.with_suffix(".log"), "w")  # noqa: SIM115 - shared by the ranks, closed below
    for rank in range(ranks):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port),
                   OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONPATH=str(REPO))
        procs.append(subprocess.Popen(args, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    try:
        return [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        log.close()


def records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank_*.json"))]


def losses(out: Path) -> dict[int, float]:
    return {int(k): v for k, v in records(out)[0]["losses"].items()}


def global_ids(out: Path) -> dict[int, list[int]]:
    """Sample ids of each step in global-batch order (dp ranks in order; tp/pp peers read the same rows)."""
    by_dp = {r["dp_rank"]: r["ids"] for r in records(out)}
    steps = by_dp[0].keys()
    return {int(s): sum((by_dp[d][s] for d in sorted(by_dp)), []) for s in steps}


def params(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "params.pt", weights_only=True)


@pytest.fixture(scope="module")
def zero1(job, tmp_path_factory) -> dict[str, Path]:
    """The dp2 ZeRO-1 run straight through, and the same run with every rank SIGKILLed after its step-10
    checkpoint."""
    tmp = tmp_path_factory.mktemp("zero1")
    assert launch(job, 2, tmp / "straight-ckpt", tmp / "straight") == [0, 0]
    killed = tmp / "ckpt"
    codes = launch(job, 2, killed, tmp / "killed", flags=("--kill-at", "10"))
    assert codes == [-signal.SIGKILL] * 2, (tmp / "killed.log").read_text()[-3000:]
    assert (killed / "latest").read_text().strip() == "step_10"
    return {"straight": tmp / "straight", "straight-ckpt": tmp / "straight-ckpt", "killed-ckpt": killed}


def assert_exact_resume(job: Path, ranks: int, ckpt: Path, straight: Path, out: Path, *overrides: str) -> None:
    assert launch(job, ranks, ckpt, out, *overrides) == [0] * ranks, out.with_suffix(".log").read_text()[-3000:]
    assert records(out)[0]["start"] == 10
    expected = losses(straight)
    assert losses(out) == {s: expected[s] for s in range(11, 21)}
    assert global_ids(out) == {s: ids for s, ids in global_ids(straight).items() if s > 10}
    final, reference = params(out), params(straight)
    assert final.keys() == reference.keys()
    for name in reference:
        assert torch.equal(final[name], reference[name]), name


def test_dp2_zero1_resumes_exactly_after_every_rank_is_killed(job, zero1, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(zero1["killed-ckpt"], ckpt)
    assert_exact_resume(job, 2, ckpt, zero1["straight"], tmp_path / "resumed")


@pytest.mark.parametrize("ranks,layout", [
    (2, ("parallel.zero_stage=3",)),
    (4, ("parallel.pp=2", "parallel.tp=2", "parallel.zero_stage=1")),
], ids=["dp2-zero3", "pp2xtp2"])
def test_resumes_exactly_in_its_own_layout(job, tmp_path, ranks, layout):
    """A new run from a copy of the straight run's step-10 checkpoint: the files a run killed after it leaves (the
    dp2 ZeRO-1 tests kill one), so the other layouts need no launch of their own for it."""
    assert launch(job, ranks, tmp_path / "straight-ckpt", tmp_path / "straight", *layout) == [0] * ranks
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tmp_path / "straight-ckpt" / "step_10", ckpt / "step_10")
    assert_exact_resume(job, ranks, ckpt, tmp_path / "straight", tmp_path / "resumed", *layout)


@pytest.mark.parametrize("ranks,layout", [
    (2, ("parallel.tp=2", "parallel.grad_accum=4")),
    (4, ("parallel.micro_batch_size=1",)),
], ids=["dp1xtp2", "dp4"])
def test_a_dp2_checkpoint_resumes_at_another_layout(job, zero1, tmp_path, ranks, layout):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(zero1["killed-ckpt"], ckpt)
    out = tmp_path / "resumed"
    assert launch(job, ranks, ckpt, out, *layout) == [0] * ranks, out.with_suffix(".log").read_text()[-3000:]
    first = records(out)[0]
    assert first["start"] == 10 and first["converted"]
    expected = losses(zero1["straight"])
    for step, loss in losses(out).items():
        assert loss == pytest.approx(expected[step], abs=1e-4), step
    assert global_ids(out) == {s: ids for s, ids in global_ids(zero1["straight"]).items() if s > 10}


def test_a_crash_while_saving_resumes_from_the_previous_checkpoint(job, zero1, tmp_path):
    ckpt = tmp_path / "ckpt"
    codes = launch(job, 2, ckpt, tmp_path / "crashed", flags=("--kill-while-saving", "20"))
    assert codes == [-signal.SIGKILL] * 2
    assert (ckpt / "latest").read_text().strip() == "step_10"
    assert (ckpt / "step_20.partial").is_dir() and not (ckpt / "step_20").exists()
    assert_exact_resume(job, 2, ckpt, zero1["straight"], tmp_path / "resumed")
    assert (ckpt / "latest").read_text().strip() == "step_20" and not (ckpt / "step_20.partial").exists()


def _digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_corrupt_checkpoint_file_is_named_and_skipped_leaving_older_ones_untouched(job, zero1, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(zero1["straight-ckpt"], ckpt)
    victim = ckpt / "step_20" / "engine" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0x55
    victim.write_bytes(bytes(data))
    older = _digests(ckpt / "step_10")
    assert_exact_resume(job, 2, ckpt, zero1["straight"], tmp_path / "resumed")
    log = (tmp_path / "resumed.log").read_text()
    assert f"skipping checkpoint step_20: {victim}: sha256" in log
    assert _digests(ckpt / "step_10") == older
    rejected = [p for p in ckpt.iterdir() if p.name.startswith("step_20.rejected-")]
    assert len(rejected) == 1 and (rejected[0] / "engine" / victim.name).read_bytes() == bytes(data)
