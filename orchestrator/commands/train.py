"""`pretrain train job.yaml [section.key=value ...]`: run one rank of a job, placed by torchrun-style variables.

    torchrun --nproc_per_node 2 -m orchestrator.cli train examples/tiny.yaml
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-endpoint HOST:29500 -m orchestrator.cli train job.yaml

RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT place the rank; none set means a single process.
The ranks started are the run's world: resources.num_nodes and gpus_per_node are set from WORLD_SIZE and
LOCAL_WORLD_SIZE, so the layout (dp × pp × tp) is checked against what was really launched.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="job spec YAML")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")


def run(args: argparse.Namespace) -> int:
    from orchestrator.validate import load_spec
    from parallel.launch import RankEnv
    from parallel.train import run as train

    env = RankEnv.from_env()
    per_node = env.local_world_size if env.world_size % env.local_world_size == 0 else env.world_size
    world = [f"resources.num_nodes={env.world_size // per_node}", f"resources.gpus_per_node={per_node}"]
    spec = load_spec(args.spec, [*args.overrides, *world], require_data=True)
    result = train(spec, env)
    if env.rank == 0:
        print(f"pretrain train: finished step {result.step}, loss {result.loss:.4f}")
    return 0
