"""Reading a rank's place from torchrun-style variables, and the messages when they are wrong."""

from __future__ import annotations

import contextlib
import socket

import pytest
import torch

from orchestrator.errors import UserError
from parallel.launch import RankEnv, pick_device

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "10.1.2.3",
            "MASTER_PORT": "29400"}


def test_torchrun_variables_place_the_rank() -> None:
    assert RankEnv.from_env(TORCHRUN) == RankEnv(rank=3, world_size=4, local_rank=1, master_addr="10.1.2.3",
                                                 master_port=29400, local_world_size=2)


def test_no_variables_mean_a_single_process() -> None:
    # torchrun's default port taken (by this socket, or already by someone else): a single process takes a free one,
    # so that two single-process runs on one machine both start
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        with contextlib.suppress(OSError):
            taken.bind(("127.0.0.1", 29500))
        alone = RankEnv.from_env({})
        assert (alone.rank, alone.world_size, alone.master_addr) == (0, 1, "127.0.0.1")
        assert alone.master_port != 29500
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", alone.master_port))


def test_a_partial_environment_names_what_is_missing() -> None:
    with pytest.raises(UserError, match="RANK, WORLD_SIZE set but MASTER_ADDR, MASTER_PORT missing"):
        RankEnv.from_env({"RANK": "0", "WORLD_SIZE": "2"})


def test_a_non_integer_is_refused() -> None:
    with pytest.raises(UserError, match="invalid literal.*RANK, WORLD_SIZE, LOCAL_RANK and MASTER_PORT are integers"):
        RankEnv.from_env({**TORCHRUN, "WORLD_SIZE": "four"})


def test_a_rank_outside_the_world_is_refused() -> None:
    with pytest.raises(UserError, match=r"RANK=4 is outside 0..WORLD_SIZE-1 \(4\)"):
        RankEnv.from_env({**TORCHRUN, "RANK": "4"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's message")
def test_cuda_on_a_machine_without_it_is_a_user_error() -> None:
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="resources.device: 'cuda' asked for, but this machine has no CUDA device"):
        pick_device("cuda")
