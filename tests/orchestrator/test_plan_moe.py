"""The planner on mixtures of experts: total and active parameters as the model has them, FLOPs from the active
ones, what a MoE block keeps for backward against autograd, memory under expert parallelism, and ep in the layout
search and in `pretrain plan`."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from test_plan_memory import block_activations

from orchestrator.cli import main
from orchestrator.planner.counting import (
    count_params,
    flops_per_token,
    routed_flops_share,
    stage_expert_params,
    stage_params,
)
from orchestrator.planner.layout import choose_layout
from orchestrator.planner.memory import GiB, ep_buffer_bytes, estimate_memory
from orchestrator.validate import parse_spec
from parallel.model import ModelDims, build_model

MOES = [
    {"num_experts": 8, "top_k": 2},
    {"num_experts": 4, "top_k": 1, "num_shared_experts": 1, "expert_ffn_dim": 64},
    {"num_experts": 16, "top_k": 4, "expert_ffn_dim": 32, "every_n_layers": 2, "first_dense_layers": 1},
]


def moe_spec(moe: dict, layers: int = 4, **sections):
    return parse_spec({"model": {"vocab_size": 512, "dim": 192, "n_layers": layers, "n_heads": 6, "n_kv_heads": 2,
                                 "multiple_of": 32, "moe": moe},
                       "parallel": {"backend": "native", **sections.pop("parallel", {})}, **sections})


@pytest.mark.parametrize("moe", MOES)
def test_total_and_active_parameters_are_the_models(moe):
    spec = moe_spec(moe)
    count, dims = count_params(spec.model), ModelDims.from_config(spec.model)
    assert count.total == sum(p.numel() for p in build_model(spec.model).parameters()) == dims.num_params()
    assert count.active == dims.active_params() < count.total
    assert flops_per_token(spec.model, 256) == dims.flops_per_token(256)
    # FLOPs count the active parameters: each MoE layer's unchosen experts do no work for the token
    dense_equivalent = 6 * (count.total - count.embedding) + 12 * 256 * 4 * 192
    unchosen = count.moe_layers * (count.experts - count.active_experts)
    assert flops_per_token(spec.model, 256) == dense_equivalent - 6 * unchosen
    assert 0 < routed_flops_share(spec.model, 256) < 1


def test_ep_holds_a_share_of_each_moe_layers_experts():
    spec = moe_spec(MOES[0], layers=4)
    count = count_params(spec.model)
    whole, split = stage_params(spec.model, pp=2), stage_params(spec.model, pp=2, ep=4)
    experts = stage_expert_params(spec.model, pp=2, ep=4)
    assert [w - s for w, s in zip(whole, split, strict=True)] == [2 * count.experts * 3 // 4] * 2
    assert sum(experts) * 4 == count.moe_layers * count.experts
    # under tp attention and the vocabulary split; a MoE layer's router and experts are whole on every tp rank
    assert stage_params(spec.model, tp=2) == [(count.embedding + count.output) // 2 + count.final_norm
                                              + 4 * (count.attention // 2 + count.norms + count.moe_mlp)]


@pytest.mark.parametrize(("dtype", "moe"), [(torch.bfloat16, MOES[0]), (torch.float32, MOES[0]),
                                            (torch.bfloat16, MOES[1]), (torch.float32, {**MOES[2], "every_n_layers": 1,
                                                                                        "first_dense_layers": 0,
                                                                                        "capacity_factor": 1.0})])
def test_moe_block_activations_match_what_autograd_saves(dtype, moe):
    """The planner counts every routed copy kept: at a capacity the (seeded) random router drops some of them, so
    autograd keeps less there, never more."""
    per_block, estimate = block_activations(lambda layers: moe_spec(moe, layers=layers), dtype)
    assert per_block <= estimate == pytest.approx(per_block, rel=0.10)


def test_ep_shrinks_what_is_gathered_not_the_shards():
    spec = moe_spec({"num_experts": 16, "top_k": 2}, layers=4, data={"seq_len": 512},
                    parallel={"micro_batch_size": 2, "precision": "bf16"}, resources={"gpus_per_node": 8})
    p = dataclasses.replace(spec.parallel, dp=8, zero_stage=1, grad_accum=2)
    one, four = estimate_memory(spec, p), estimate_memory(spec, dataclasses.replace(p, ep=4))
    held = stage_params(spec.model)[0] - stage_params(spec.model, ep=4)[0]  # the experts a rank no longer holds
    assert held > 0
    assert (one.weights, one.optimizer, one.activations) == (four.weights, four.optimizer, four.activations)
    assert one.gradients - four.gradients == 4 * held  # ZeRO-1's whole fp32 gradients: the rank's experts only
    in_flight = ep_buffer_bytes(spec.model, dataclasses.replace(p, ep=4), 512, 2)
    assert in_flight == 4 * (2 * 512) * 2 * 192 * 2  # sent and received, both ways: tokens × top_k × dim, bf16
    assert one.overhead - four.overhead == 2 * held - in_flight  # the bf16 weights gathered: the rank's experts


@pytest.mark.parametrize("mode", ["none", "full", "selective"])
def test_selective_under_ep_keeps_the_routed_copies_both_ways(mode):
    """Selective checkpointing keeps the all-to-alls' outputs (`parallel.activation_checkpoint`): each MoE layer's
    routed copies as they arrive at the experts and as they come back; the other modes keep what they kept."""
    spec = moe_spec({**MOES[2], "every_n_layers": 1}, layers=4, data={"seq_len": 512},
                    parallel={"micro_batch_size": 2, "precision": "bf16", "activation_checkpointing": mode},
                    resources={"gpus_per_node": 8})
    p = dataclasses.replace(spec.parallel, dp=8, zero_stage=1)
    one, four = (estimate_memory(spec, dataclasses.replace(p, ep=ep)).activations for ep in (1, 4))
    moe_layers, tokens, copies = 3, 2 * 512, 2 * MOES[2]["top_k"]
    assert four - one == (moe_layers * tokens * copies * 192 * 2 if mode == "selective" else 0)


def test_the_layout_search_takes_ep_when_memory_needs_it(tmp_path, capsys):
    document = {"name": "moe", "data": {"seq_len": 1024}, "resources": {"gpus_per_node": 8},
                "model": {"vocab_size": 32000, "dim": 1024, "n_layers": 8, "n_heads": 8, "ffn_dim": 4096,
                          "moe": {"num_experts": 64, "top_k": 4, "expert_ffn_dim": 1024}},
                "parallel": {"backend": "native", "micro_batch_size": 1, "grad_accum": 8, "precision": "bf16"}}
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(document))
    spec = parse_spec(document)
    roomy = choose_layout(spec, gpus=8, gpu_mem_bytes=1024 * GiB)
    smallest = {ep: min(c.memory.total for c in roomy.ranked if c.parallel.ep == ep) for ep in (1, 2, 4, 8)}
    assert smallest[8] < smallest[4] < smallest[2] < smallest[1]
    tight = (smallest[1] + smallest[8]) / 2  # fits only with experts split
    assert main(["plan", str(path), "--gpu-mem", f"{tight / GiB:.3f}GiB", "--top", "3"]) == 0
    out = capsys.readouterr().out
    count = count_params(spec.model)
    assert f"route each token to 4 of 64 experts: {count.active / 1e6:.3g}M active parameters of " \
           f"{count.total / 1e9:.3g}B" in out
    chosen = next(line for line in out.splitlines() if line.startswith("chosen: "))
    assert " ep=" in chosen and "  ep  " in out  # the table's ep column
