"""`parallelize_llama` applies the techniques in its documented order, skips the ones the layout does not use, and
the model module knows nothing of them.

The engines' techniques need process groups; here each step is a recording function handed in the same way, and
what the built-in steps (checkpointing, compile) did to the blocks is read off the blocks themselves, so the test
shows which step saw which. The engines' own layout tests (test_native_engine.py, test_deepspeed_engine.py) check
that the result trains as one process does.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
from pathlib import Path

import pytest
from torch import nn

from orchestrator.validate import parse_spec
from parallel.model import build_model
from parallel.parallel_dims import ParallelDims
from parallel.parallelize import Parallelized, Techniques, parallelize_model

REPO = Path(__file__).resolve().parents[2]
MODEL = {"n_layers": 4, "vocab_size": 96, "dim": 64, "n_heads": 4}
EVERYTHING = {"tp": 2, "pp": 2, "grad_accum": 2, "zero_stage": 3, "compile": True, "activation_checkpointing": "full",
              "backend": "native"}


def checkpointed(blocks: list[nn.Module]) -> bool:
    return all(isinstance(block.forward, functools.partial) for block in blocks)


def compiled(blocks: list[nn.Module]) -> bool:
    return all(block._compiled_call_impl is not None for block in blocks)


def recording(seen: list) -> Techniques:
    def tensor_parallel(state: Parallelized, dims: ParallelDims, spec) -> None:
        seen.append(("tp", checkpointed(state.blocks), compiled(state.blocks)))

    def pipeline(state: Parallelized, dims: ParallelDims, spec) -> None:
        seen.append(("pp", checkpointed(state.blocks), compiled(state.blocks)))
        state.blocks = state.blocks[:2]

    def data_parallel(state: Parallelized, dims: ParallelDims, spec) -> None:
        seen.append(("dp", len(state.blocks)))

    return Techniques(tensor_parallel=tensor_parallel, pipeline=pipeline, data_parallel=data_parallel,
                      compile_under_zero3=True)


def run(parallel: dict, dims: ParallelDims, techniques: Techniques) -> Parallelized:
    spec = parse_spec({"model": MODEL, "parallel": parallel,
                       "resources": {"gpus_per_node": dims.dp * dims.pp * dims.tp}})
    return parallelize_model(build_model(spec.model), dims, spec, techniques, "cpu")


def test_tensor_parallel_then_checkpointing_and_compile_then_pipeline_then_data_parallel():
    seen: list = []
    state = run(EVERYTHING, ParallelDims(dp=2, pp=2, tp=2), recording(seen))
    assert seen == [("tp", False, False), ("pp", True, True), ("dp", 2)]
    assert checkpointed(state.blocks) and compiled(state.blocks)


def test_a_layout_of_one_rank_applies_no_technique():
    seen: list = []
    state = run({"compile": True}, ParallelDims(dp=1, pp=1, tp=1), recording(seen))
    assert seen == []
    assert compiled(state.blocks) and not checkpointed(state.blocks)
    assert state.module is state.model and state.roots == [state.model]


@pytest.mark.parametrize(("zero_stage", "compiles"), [(2, True), (3, False)])
def test_an_engine_whose_zero3_hooks_into_blocks_compiles_only_below_stage_3(zero_stage: int, compiles: bool):
    techniques = dataclasses.replace(recording([]), compile_under_zero3=False)
    state = run({"compile": True, "zero_stage": zero_stage, "backend": "deepspeed"}, ParallelDims(dp=2, pp=1, tp=1),
                techniques)
    assert compiled(state.blocks) == compiles


def test_a_sequence_validation_would_refuse_is_an_assertion():
    spec = parse_spec({"model": MODEL, "parallel": {"tp": 2, "sequence_parallel": True},
                       "resources": {"gpus_per_node": 2}, "data": {"seq_len": 64}})
    spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, seq_len=63))
    with pytest.raises(AssertionError, match="sequence splits over tp"):
        parallelize_model(build_model(spec.model), ParallelDims(dp=1, pp=1, tp=2), spec, recording([]), "cpu")


def test_the_model_imports_no_parallel_technique():
    tree = ast.parse((REPO / "parallel" / "model.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert "torch" in imported
    # Model code, not techniques: the rotary embedding and its scalings, μP's scales, per-document masks, the
    # mixture-of-experts block (expert parallelism lives in parallel.expert_parallel)
    model_code = {"parallel.rope", "parallel.mup", "parallel.documents", "parallel.moe"}
    assert not {name for name in imported if name and name.startswith("parallel")} - model_code
