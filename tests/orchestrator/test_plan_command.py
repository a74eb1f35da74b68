"""`pretrain plan` end to end through the CLI: the table, the spec's own layout, exit code 2 with the reason."""

from __future__ import annotations

import pytest

from orchestrator.cli import main
from orchestrator.commands.plan import parse_gpu_mem


def test_prints_model_spec_layout_and_ranked_table(repo_root, capsys):
    assert main(["plan", str(repo_root / "examples" / "llama-8b.yaml"), "--gpus", "32", "--gpu-mem", "80GiB",
                 "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("llama-8b: 8.03B parameters (embedding 525M, 32 blocks × 218M, output 525M); 57.9 GFLOP")
    assert "the spec's layout on 32 GPUs: dp=8 pp=2 tp=2 ZeRO-1" in out
    assert "fits in 80.0 GiB" in out
    table = out.split("fastest layouts for 32 GPUs × 80 GiB (8 per node)")[1].splitlines()
    assert table[1].split()[:5] == ["#", "dp", "pp", "tp", "ZeRO"]
    assert [row.split()[0] for row in table[2:5]] == ["1", "2", "3"]
    assert "\nchosen: dp=" in out


def test_overrides_apply_before_planning(repo_root, capsys):
    assert main(["plan", str(repo_root / "examples" / "llama-124m.yaml"), "model.n_layers=24", "--top", "1"]) == 0
    assert "24 blocks" in capsys.readouterr().out


def test_no_fit_exits_2_with_the_reason(repo_root, capsys):
    assert main(["plan", str(repo_root / "examples" / "llama-8b.yaml"), "--gpus", "2", "--gpus-per-node", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pretrain plan: llama-8b: 8.03B parameters fit no layout of 2 GPUs × 80.0 GiB")
    assert "it would fit with: " in err


def test_bad_memory_size_is_named(repo_root, capsys):
    assert main(["plan", str(repo_root / "examples" / "tiny.yaml"), "--gpu-mem", "lots"]) == 2
    assert "--gpu-mem: 'lots' is not a memory size; use e.g. 80GiB, 80GB or 81920MiB" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "size"), [("80GiB", 80 * 2**30), ("80GB", 80e9), ("81920MiB", 80 * 2**30),
                                            ("141 gb", 141e9), ("24", 24 * 2**30)])
def test_memory_sizes(text, size):
    assert parse_gpu_mem(text) == int(size)
