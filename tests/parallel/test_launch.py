"""Reading a rank's place from torchrun-style variables, and the messages when they are wrong."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys

import pytest
import torch

from orchestrator.errors import UserError
from parallel.launch import RankEnv, pick_device
from tests.helpers import REPO

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "10.1.2.3",
            "MASTER_PORT": "29400"}


def test_torchrun_variables_place_the_rank() -> None:
    assert RankEnv.from_env(TORCHRUN) == RankEnv(rank=3, world_size=4, local_rank=1, master_addr="10.1.2.3",
                                                 master_port=29400, local_world_size=2)


def test_no_variables_mean_a_single_process_on_a_port_bound_as_it_joins() -> None:
    alone = RankEnv.from_env({})
    assert (alone.rank, alone.world_size, alone.master_addr, alone.master_port) == (0, 1, "127.0.0.1", 0)
    # torchrun's default port taken (by this socket, or already by someone else): two single-process runs started
    # together each bind a port of their own as they join, so both start
    join = ("import torch, torch.distributed as dist\n"
            "from parallel.launch import RankEnv, init_distributed\n"
            "init_distributed(RankEnv.from_env({}), torch.device('cpu'))\n"
            "t = torch.ones(1)\ndist.all_reduce(t)\nprint(dist.get_world_size(), int(t.item()))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        with contextlib.suppress(OSError):
            taken.bind(("127.0.0.1", 29500))
        runs = [subprocess.Popen([sys.executable, "-c", join], env={**env, "PYTHONPATH": str(REPO)},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert [out.split() for out, _ in outputs] == [["1", "1"], ["1", "1"]]


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


def test_a_store_opened_before_the_group_holds_its_port_until_the_group_forms() -> None:
    """The Ray controller learns rank 0's port from the store rank 0 already listens on: nothing else on the node can
    bind that port before the group forms (a port merely found free was taken once, failing the attempt)."""
    first = ("import socket, torch, torch.distributed as dist\n"
             "from parallel.launch import RankEnv, init_distributed, open_store, shutdown_distributed\n"
             "store = open_store()\nprint(store.port, flush=True)\n"
             "try:\n    socket.create_server(('', store.port))\n    print('taken', flush=True)\n"
             "except OSError:\n    print('held', flush=True)\n"
             "env = RankEnv(rank=0, world_size=2, master_port=store.port, store=store)\n"
             "init_distributed(env, torch.device('cpu'))\n"
             "t = torch.ones(1)\ndist.all_reduce(t)\nprint(int(t.item()))\nshutdown_distributed()\n")
    other = ("import sys, torch, torch.distributed as dist\n"
             "from parallel.launch import RankEnv, connect_store, init_distributed, shutdown_distributed\n"
             "port = int(sys.argv[1])\nstore = connect_store('127.0.0.1', port)\n"
             "init_distributed(RankEnv(rank=1, world_size=2, master_port=port, store=store), torch.device('cpu'))\n"
             "t = torch.ones(1)\ndist.all_reduce(t)\nprint(int(t.item()))\nshutdown_distributed()\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "GLOO_SOCKET_IFNAME": "lo"}
    rank0 = subprocess.Popen([sys.executable, "-c", first], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    port = rank0.stdout.readline().strip()
    rank1 = subprocess.run([sys.executable, "-c", other, port], env=env, capture_output=True, text=True, timeout=300)
    out, err = rank0.stdout.read(), rank0.stderr.read()  # not communicate(): it would skip what readline buffered
    rank0.wait(timeout=60)
    assert (rank0.returncode, rank1.returncode) == (0, 0), err[-2000:] + rank1.stderr[-2000:]
    assert out.split() == ["held", "2"] and rank1.stdout.split() == ["2"]
