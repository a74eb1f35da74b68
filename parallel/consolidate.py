"""A checkpoint of any layout as one full state dict: restart its layout in local gloo processes, load it, gather.

    step_dir = find_checkpoint("runs/tiny/checkpoints")               # the newest complete step_<N>, or one named
    consolidate(spec, step_dir, HFWriter("out/", HFExport(...)))      # rank 0 hands the whole model to the writer

Why restart the layout rather than read the files: the engine that wrote a checkpoint is the one reader that knows
its format for every combination of backend, ZeRO stage, tensor and pipeline parallelism. DeepSpeed's ZeRO files
hold flattened, padded partitions per rank, its pipeline files name layers by stage, the native backend writes DCP;
`parallel.restore` loads each of them exactly as a resume does (checksums verified first), and
`Engine.full_state_dict` is the gathering code the layout-equivalence tests hold to one process. Reading
DeepSpeed's files directly (zero_to_fp32, or its universal checkpoint) would cover one backend, follow its file
format from version to version, and the universal route writes a converted copy of the optimizer state (three times
the model) beside the checkpoint. The price for DeepSpeed's checkpoints: as many processes as the run had ranks, on
this machine's CPUs, holding together about the checkpoint's size in memory (model and optimizer state, each rank its
share). The native backend's DCP checkpoints reshard on load, so one process reads any layout's: the same memory,
one process's start instead of one per rank, and no collectives.
"""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from orchestrator.errors import CheckpointError, UserError
from orchestrator.spec import JobSpec
from parallel.checkpoint_layout import LATEST_FILE, LAYOUT_FILE, MANIFEST_FILE, STEP_PREFIX, read_layout, step_of
from parallel.hf import HFExport, save_hf
from parallel.launch import join_store, open_store
from parallel.model import ModelDims

_ERROR_FILE = "error_rank_{}.txt"
_POLL_S = 0.2


class StateWriter(Protocol):
    """What rank 0 does with the gathered model; pickled to the rank processes, so a plain dataclass."""

    def __call__(self, state: dict[str, torch.Tensor], dims: ModelDims) -> Any: ...


@dataclass
class HFWriter:
    directory: str
    how: HFExport

    def __call__(self, state: dict[str, torch.Tensor], dims: ModelDims) -> list[str]:
        return save_hf(self.directory, state, dims, self.how)


@dataclass
class TorchWriter:
    """The full state dict as one `torch.save` file, written whole or not at all."""

    path: str

    def __call__(self, state: dict[str, torch.Tensor], dims: ModelDims) -> str:
        partial = f"{self.path}.partial"
        torch.save(state, partial)
        os.replace(partial, self.path)
        return self.path


def find_checkpoint(path: str) -> str:
    """A complete step_<N> directory: `path` itself, or the newest one under a checkpoint directory."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if os.path.exists(os.path.join(path, LAYOUT_FILE)) or os.path.basename(os.path.normpath(path)).startswith(
            STEP_PREFIX):
        if not os.path.exists(os.path.join(path, MANIFEST_FILE)):
            raise CheckpointError(f"{path}: incomplete checkpoint, it has no {MANIFEST_FILE} (the run stopped while "
                                  "writing it); pick an earlier step_<N>")
        return path
    latest = os.path.join(path, LATEST_FILE)
    if os.path.isfile(latest):
        with open(latest, encoding="utf-8") as f:
            named = os.path.join(path, f.read().strip())
        if os.path.exists(os.path.join(named, MANIFEST_FILE)):
            return named
    steps = sorted((step, n) for n in os.listdir(path) if (step := step_of(n)) is not None
                   and os.path.exists(os.path.join(path, n, MANIFEST_FILE)))
    if not steps:
        raise CheckpointError(f"{path}: holds no complete checkpoint (a step_<N> directory with {MANIFEST_FILE}); "
                              "give a checkpoint directory or one of its step_<N>")
    return os.path.join(path, steps[-1][1])


def saved_layout(step_dir: str) -> dict[str, int]:
    return read_layout(os.path.join(step_dir, LAYOUT_FILE))


def layout_spec(spec: JobSpec, step_dir: str) -> JobSpec:
    """The run's spec in a layout that reads the checkpoint, on this machine's CPUs, reading checkpoints beside it:
    DeepSpeed's own layout; one process for the native backend's, whose DCP checkpoints load into any layout."""
    layout = saved_layout(step_dir)
    spec = copy.deepcopy(spec)
    p = spec.parallel
    p.backend = layout["backend"]  # the engine that wrote it is the one that reads it
    p.dp, p.pp, p.tp = (1, 1, 1) if p.backend == "native" else (layout["dp"], layout["pp"], layout["tp"])
    p.zero_stage = layout["zero_stage"]
    p.cp = p.ep = 1  # only the native engine has cp and ep
    p.compile = False  # compiling costs more than the one gather it would speed up
    spec.resources.device, spec.resources.num_nodes = "cpu", 1
    spec.resources.gpus_per_node = p.dp * p.pp * p.tp
    spec.checkpoint.dir = os.path.dirname(os.path.normpath(step_dir))
    if spec.checkpoint.init_from:  # a LoRA run's frozen model, read by ranks started in another directory
        spec.checkpoint.init_from = os.path.abspath(spec.checkpoint.init_from)
    spec.checkpoint.async_save = False
    return spec


def consolidate(spec: JobSpec, step_dir: str, write: StateWriter) -> None:
    """Load checkpoint `step_dir` of `spec`'s run in its own layout and give rank 0's full state dict to `write`."""
    step_dir = os.path.abspath(step_dir)  # the ranks run in a scratch directory
    spec = layout_spec(spec, step_dir)
    world = spec.world_size
    with tempfile.TemporaryDirectory(prefix="pretrain-consolidate-") as work:
        job = os.path.join(work, "job.pkl")
        with open(job, "wb") as f:
            pickle.dump((spec, step_dir, write), f)
        _run_ranks(world, job, work)


def _run_ranks(world: int, job: str, work: str) -> None:
    """Start `world` rank processes, wait for all; a failing rank stops the others and its error is raised."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # The group's store is held here, listening before any rank starts, until every rank is done: a port found free
    # and bound later by rank 0 could be taken in between.
    store = open_store()
    # Started from a torchrun rank (resuming across backends), the inherited TORCHELASTIC_* variables would have
    # these ranks look for torchrun's store instead of this one.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
    base = {**inherited, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world), "GLOO_SOCKET_IFNAME": "lo",
            "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world)),
            "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    procs = []
    for rank in range(world):
        log = open(os.path.join(work, f"rank_{rank}.log"), "wb")  # noqa: SIM115 - closed with its process below
        env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        procs.append((subprocess.Popen([sys.executable, "-m", "parallel.consolidate", job], env=env, stdout=log,
                                       stderr=subprocess.STDOUT, cwd=work), log))
    try:
        while True:
            codes = [p.poll() for p, _ in procs]
            failed = next((r for r, code in enumerate(codes) if code), None)
            if failed is not None or all(code == 0 for code in codes):
                break
            time.sleep(_POLL_S)
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            log.close()
    if failed is not None:
        error_file = os.path.join(work, _ERROR_FILE.format(failed))
        if os.path.exists(error_file):
            with open(error_file, encoding="utf-8") as f:
                raise CheckpointError(f.read())
        with open(os.path.join(work, f"rank_{failed}.log"), encoding="utf-8", errors="replace") as f:
            tail = "\n".join(f.read().strip().splitlines()[-20:])
        raise CheckpointError(f"gathering the checkpoint failed on rank {failed} of {world}:\n{tail}")


def _rank_main(job: str) -> None:
    """One rank: build the engine in the saved layout, restore the checkpoint, gather, rank 0 writes."""
    from parallel.checkpoint import Checkpointer
    from parallel.engine import build_engine
    from parallel.launch import RankEnv, init_distributed, shutdown_distributed
    from parallel.restore import load_engine, open_checkpoint

    with open(job, "rb") as f:
        spec, step_dir, write = pickle.load(f)
    env = join_store(RankEnv.from_env())
    try:
        device = torch.device("cpu")
        init_distributed(env, device)
        engine = build_engine(spec, env, device)
        checkpointer = Checkpointer(spec, engine.dims)
        name = os.path.basename(os.path.normpath(step_dir))
        broken = checkpointer.verify_everywhere(name)
        if broken:
            raise CheckpointError(broken[0])
        load_engine(checkpointer, engine, open_checkpoint(checkpointer, name))
        state = engine.full_state_dict()
        if env.rank == 0:
            write(state, engine.model_dims)
        shutdown_distributed()
    except UserError as e:
        with open(_ERROR_FILE.format(env.rank), "w", encoding="utf-8") as f:
            f.write(str(e))
        sys.stdout.flush()
        os._exit(2)
    sys.stdout.flush()
    os._exit(0)  # DeepSpeed's ZeRO-3 may abort at interpreter exit after a clean finish


if __name__ == "__main__":
    _rank_main(sys.argv[1])
