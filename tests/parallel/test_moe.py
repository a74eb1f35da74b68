"""Mixture of experts (`parallel.moe`): the grouped GEMM and the per-expert loop against a per-token reference,
dropless and capacity routing, both balancing methods, activation checkpointing, decoding with a KV cache, the
spec's refusals; dp2 FSDP, pp2 and cp2 against one process in one 2-rank launch; training on real shards in this
process, resumed exactly (the aux-free bias included)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch._dynamo.utils import counters
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from orchestrator.cli import main as pretrain
from orchestrator.errors import SpecError
from orchestrator.spec import ModelConfig, MoEConfig
from orchestrator.validate import load_spec, parse_spec
from parallel import train
from parallel.activation_checkpoint import apply_activation_checkpointing
from parallel.callbacks import BaseCallback, StepStats
from parallel.generate import SamplingConfig, generate
from parallel.launch import RankEnv
from parallel.materialize import materialize_model
from parallel.model import build_model, cross_entropy
from parallel.moe import GroupedExperts, MoE, gated, moe_layers, routing_stats, update_expert_bias
from tests.helpers import PARAM_ATOL, RTOL, reference_run, run_layout
from tests.parallel.test_hf_layouts import byte_tokenizer
from tests.shards import write_job, write_shards

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_moe(seed: int = 3, **moe) -> torch.nn.Module:
    """A 2-layer model whose layers are both MoE (4 experts unless said), on CPU, in fp32."""
    config = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16,
                         moe=MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_ffn_dim": 16, **moe}))
    model = build_model(config)
    materialize_model(model, seed=seed, device=torch.device("cpu"))
    return model


def naive_moe(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoE output computed token by token from the definition, and the copies dropped per expert: scores,
    choice by score + bias, each chosen expert's SwiGLU on the token (unless its queue is full, in token order),
    weighted by the (renormalised) score, plus the shared experts."""
    d = moe.moe
    flat = x.reshape(-1, x.shape[-1])
    logits = flat @ moe.gate.weight.T
    scores = logits.softmax(-1) if d.score == "softmax" else logits.sigmoid()
    chosen = (scores + moe.expert_bias).topk(d.top_k, dim=-1).indices
    capacity = d.capacity(len(flat)) if d.capacity_factor else len(flat) * d.top_k
    taken, dropped = [0] * d.num_experts, torch.zeros(d.num_experts)
    e_ = moe.experts
    out = torch.zeros_like(flat)
    for t, token in enumerate(flat):
        weights = scores[t, chosen[t]]
        if d.norm_topk:
            weights = weights / weights.sum()
        for e, w in zip(chosen[t].tolist(), weights, strict=True):
            if taken[e] == capacity:
                dropped[e] += 1
                continue
            taken[e] += 1
            out[t] += w * (e_.down_proj[e] @ gated(e_.gate_proj[e] @ token, e_.up_proj[e] @ token, "silu"))
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(flat)
    return out.view_as(x), dropped


def test_experts_built_on_a_device_start_as_linear_layers_do():
    """Built on a real device and run before `init_weights` (as the planner's memory tests do), the experts must
    hold numbers like the dense layers' default, not uninitialised memory."""
    experts = GroupedExperts(num_experts=8, dim=64, ffn_dim=256)
    for weight in (experts.gate_proj, experts.up_proj, experts.down_proj):
        fan_in = weight.shape[-1]
        assert weight.abs().max() <= fan_in ** -0.5
        assert weight.std().item() == pytest.approx((3 * fan_in) ** -0.5, rel=0.05)


@pytest.mark.parametrize("moe", [
    {},
    {"score": "sigmoid", "norm_topk": False, "num_shared_experts": 1},
    {"capacity_factor": 0.5, "top_k": 1},
], ids=["softmax", "sigmoid-shared", "capacity"])
def test_grouped_gemm_and_loop_equal_the_per_token_definition(moe):
    model = tiny_moe(**moe)
    layer = model.layers[0].mlp
    with torch.no_grad():
        layer.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))  # moves choices; weights stay the scores'
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    results = []
    for grouped in (True, False):
        layer.experts.grouped_mm = grouped
        y = layer(x)
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, 32)).sum(), [x, *layer.parameters()])
        results.append((y.detach(), grads, layer.statistics().clone()))
        layer.reset_statistics()
    (y_grouped, g_grouped, s_grouped), (y_loop, g_loop, s_loop) = results
    torch.testing.assert_close(y_grouped, y_loop, rtol=0, atol=1e-6)
    for a, b in zip(g_grouped, g_loop, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert torch.equal(s_grouped, s_loop)
    want, dropped = naive_moe(layer, x.detach())
    torch.testing.assert_close(y_loop, want, rtol=0, atol=1e-5)
    n = layer.moe.num_experts
    assert s_loop[:n].sum() == 32 * layer.moe.top_k  # every copy counted, dropped or not
    assert torch.equal(s_loop[n:2 * n], dropped)
    assert (dropped.sum() > 0) == bool(layer.moe.capacity_factor)


def test_the_balancing_loss_and_z_loss_reach_the_router_only_when_asked():
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))

    def router_grad(scale: float = 1.0, **moe) -> torch.Tensor:
        layer = tiny_moe(**moe).layers[0].mlp
        layer.aux_grad_scale = scale
        (layer(x) * 0).sum().backward()  # nothing from the output: only what the auxiliary losses send
        return layer.gate.weight.grad if layer.gate.weight.grad is not None else torch.zeros(1)

    assert not router_grad().any()  # aux_free: the bias only chooses, no loss
    aux = router_grad(balance="aux_loss", aux_loss_coef=0.01)
    assert aux.abs().sum() > 0
    torch.testing.assert_close(router_grad(0.5, balance="aux_loss", aux_loss_coef=0.01), aux / 2)
    assert router_grad(router_z_loss_coef=1e-3).abs().sum() > 0
    batch = router_grad(balance="aux_loss", aux_loss_coef=0.01, aux_loss_per="batch")
    assert batch.abs().sum() > 0 and not torch.allclose(batch, aux)


def test_the_aux_free_bias_moves_the_load_toward_balance():
    """DeepSeek-V3's pairing (sigmoid scores, sign-step bias) on a router that sends every token to expert 0."""
    model = tiny_moe(num_experts=8, top_k=2, score="sigmoid", bias_update_rate=0.01)
    tokens = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mean = model.embed_tokens.weight.mean(0)
        for _, moe in moe_layers(model):
            moe.gate.weight[0] += 3 * mean / mean.norm()

    def load_ratio() -> float:
        model(tokens)
        update_expert_bias(model, None)
        return max(s.max_load / s.mean_load for s in routing_stats(model))

    ratios = [load_ratio() for _ in range(80)]
    assert ratios[0] > 2.5 and max(ratios[-10:]) < 1.6, ratios
    bias = model.layers[0].mlp.expert_bias
    assert bias[0] == bias.min() and abs(float(bias.sum())) < 1e-5  # the favourite held back; centred


@pytest.mark.parametrize("mode", ["none", "full", "selective"])
def test_compiled_moe_blocks_have_no_graph_break_and_count_once(mode):
    """A graph break inside a checkpointed block leaves the whole block uncompiled (dynamo cannot capture the
    checkpointed region), so the routing statistics are recorded inside the graph: the grouped path (CUDA's) compiles
    whole in every checkpointing mode, counts each token once, and matches eager."""
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(3))
    results = []
    for compiled in (False, True):
        model = tiny_moe(balance="both")
        for _, moe in moe_layers(model):
            moe.experts.grouped_mm = True
        apply_activation_checkpointing(model.layers, mode)
        torch._dynamo.reset()
        counters.clear()
        if compiled:
            for layer in model.layers:
                layer.compile(backend="aot_eager")
        with torch.autocast("cpu", torch.bfloat16):  # the grouped kernel's dtype
            loss = cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        results.append(([p.grad for p in model.parameters()], [moe.statistics() for _, moe in moe_layers(model)]))
    assert sum(counters["graph_break"].values()) == 0 and counters["stats"]["unique_graphs"] >= 1
    (want, want_stats), (got, got_stats) = results
    experts = 4
    for got_layer, want_layer in zip(got_stats, want_stats, strict=True):
        assert torch.equal(got_layer[:2 * experts], want_layer[:2 * experts])  # tokens and drops per expert
        assert got_layer[:experts].sum() == 2 * 16 * 2 and got_layer[-1] == 1  # every copy once, one forward
        torch.testing.assert_close(got_layer, want_layer)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("mode,grouped", [("full", False), ("selective", False), ("selective", True)])
def test_activation_checkpointing_recomputes_without_counting_twice(mode, grouped):
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(3))
    results = []
    for checkpointing in ("none", mode):
        model = tiny_moe(balance="both", num_shared_experts=1)
        for _, moe in moe_layers(model):
            moe.experts.grouped_mm = grouped
        apply_activation_checkpointing(model.layers, checkpointing)
        cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]).backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        results.append((grads, [moe.statistics() for _, moe in moe_layers(model)]))
    (want, want_stats), (got, got_stats) = results
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    for a, b in zip(got_stats, want_stats, strict=True):
        torch.testing.assert_close(a, b)


def test_decoding_with_a_cache_gives_the_tokens_of_full_forwards():
    model = tiny_moe(num_shared_experts=1).eval()
    config = SamplingConfig(max_new_tokens=8, temperature=0)
    cached = generate(model, [[1, 2, 3, 4], [5, 6]], config)
    assert cached.tokens == generate(model, [[1, 2, 3, 4], [5, 6]], config, use_cache=False).tokens
    assert not model.layers[0].mlp.tokens_per_expert.any()  # forwards without gradients are not counted


@pytest.mark.parametrize("overrides,match", [
    (["model.moe.top_k=5"], r"model\.moe\.top_k: 5 is more than model\.moe\.num_experts=4"),
    (["model.moe.first_dense_layers=4"], r"model\.moe\.first_dense_layers: 4 leaves no MoE layer"),
    (["model.moe.every_n_layers=5"], r"model\.moe\.every_n_layers: 5 picks no layer"),
    (["model.moe.balance=aux_loss", "model.moe.aux_loss_coef=0"], r"model\.moe\.aux_loss_coef: 0 with"),
    (["model.moe.bias_update_rate=0"], r"model\.moe\.bias_update_rate: 0 with model\.moe\.balance=aux_free"),
    (["parallel.backend=deepspeed"], r"parallel\.backend: deepspeed cannot train model\.moe\.num_experts=4"),
    (["model.lora.rank=4"], r"model\.lora\.targets: gate_proj, up_proj, down_proj with model\.moe"),
])
def test_impossible_moe_specs_are_refused_naming_the_field(overrides, match):
    with pytest.raises(SpecError, match=match):
        parse_spec({"model": {"moe": {"num_experts": 4}}}, overrides=overrides)


def test_a_moe_spec_runs_native_and_counts_active_parameters():
    spec = parse_spec({"model": {"vocab_size": 1024, "dim": 256, "n_layers": 4, "moe": {
        "num_experts": 8, "top_k": 2, "num_shared_experts": 1, "first_dense_layers": 1}}})
    assert spec.parallel.backend == "native"
    model = build_model(spec.model)
    dims = model.dims
    assert [dims.is_moe(i) for i in range(4)] == [False, True, True, True]
    assert dims.num_params() == sum(p.numel() for p in model.parameters())
    expert = 3 * 256 * dims.moe.ffn_dim
    assert dims.num_params() - dims.active_params() == 3 * (8 - 2) * expert
    dense = parse_spec({"model": {"vocab_size": 1024, "dim": 256, "n_layers": 4}})
    assert build_model(dense.model).dims.flops_per_token(256) < dims.flops_per_token(256)


# -------------------------------------------------------------------------------------------- layouts, real shards

MOE = ["parallel.backend=native", "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.bias_update_rate=0.01"]
CASES = {
    "dp2-fsdp": [*MOE, "model.moe.num_shared_experts=1", "model.moe.balance=both", "model.moe.aux_loss_coef=0.01",
                 "model.moe.router_z_loss_coef=0.001", "parallel.zero_stage=3"],
    "pp2": [*MOE, "model.moe.every_n_layers=2", "parallel.pp=2", "parallel.grad_accum=2"],
    "cp2": [*MOE, "model.moe.balance=both", "model.moe.aux_loss_coef=0.01", "parallel.cp=2"],
}


def test_dp2_fsdp_pp2_and_cp2_equal_one_process(tmp_path):
    references = {name: reference_run(["parallel.backend=native", *(o for o in overrides if o.startswith("model."))])
                  for name, overrides in CASES.items()}
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps(CASES))
    results = run_layout(2, ["--cases", str(cases)], tmp_path / "result.pt", tmp_path)
    for name, expected in references.items():
        got = results[name]
        assert expected["losses"][-1] < expected["losses"][0] - 0.1, "the reference run should learn something"
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(expected["losses"]), rtol=RTOL, atol=0)
        assert got["params"].keys() == expected["params"].keys()
        for key, value in expected["params"].items():
            torch.testing.assert_close(got["params"][key], value, rtol=0, atol=PARAM_ATOL,
                                       msg=lambda m, n=f"{name} {key}": f"{n}: {m}")
        assert any(v.abs().sum() > 0 for k, v in expected["params"].items() if k.endswith("expert_bias")), name


class Record(BaseCallback):
    def __init__(self):
        self.steps: dict[int, StepStats] = {}

    def on_step(self, stats: StepStats) -> None:
        self.steps[stats.step] = stats


def expert_bias(step_dir: Path, out: Path) -> torch.Tensor:
    dcp_to_torch_save(step_dir / "engine" / "dcp", out)
    model = torch.load(out, weights_only=False)["model"]
    return torch.stack([model[f"layers.{i}.mlp.expert_bias"] for i in range(2)])


def test_training_on_real_shards_resumes_exactly_and_generates(tmp_path, capsys):
    """8 steps checkpointed at 4 and 8; the step-8 checkpoint removed, the run resumes from step 4 and trains steps
    5-8 to the same losses and the same aux-free bias; `pretrain generate` continues a prompt from the checkpoint."""
    shards = write_shards(tmp_path / "shards", seq_len=32, rows=160)
    byte_tokenizer(shards / "tokenizer.json")
    job = write_job(tmp_path / "job.yaml", shards, 32, name="moe",
                    model={"dim": 32, "n_layers": 2, "n_heads": 2, "multiple_of": 16,
                           "moe": {"num_experts": 4, "top_k": 2, "expert_ffn_dim": 32, "bias_update_rate": 0.01}},
                    parallel={"precision": "fp32", "micro_batch_size": 4, "grad_accum": 2, "zero_stage": 0},
                    optim={"lr": 3e-3, "min_lr": 3e-4},
                    schedule={"steps": 8, "warmup_steps": 2, "eval_every": 0, "log_every": 100},
                    checkpoint={"dir": str(tmp_path / "ckpt"), "every": 4, "async_save": False})
    spec = load_spec(job, require_data=True)
    assert spec.parallel.backend == "native"
    straight, resumed = Record(), Record()
    train.run(spec, RankEnv(master_port=0), [straight])
    bias = expert_bias(tmp_path / "ckpt" / "step_8", tmp_path / "straight.pt")
    shutil.rmtree(tmp_path / "ckpt" / "step_8")
    assert train.run(spec, RankEnv(master_port=0), [resumed]).resumed_from == 4

    assert straight.steps[8].loss < straight.steps[1].loss - 0.5, "the model learns"
    assert {s: r.loss for s, r in resumed.steps.items()} == {s: r.loss for s, r in straight.steps.items() if s > 4}
    assert bias.abs().sum() > 0 and torch.equal(expert_bias(tmp_path / "ckpt" / "step_8", tmp_path / "again.pt"), bias)
    capsys.readouterr()
    assert pretrain(["generate", str(tmp_path / "ckpt"), "--prompt", "In the beginning", "--temperature", "0",
                     "--max-new-tokens", "6"]) == 0
    assert re.search(r"^\[1\] In the beginning.*\npretrain generate: 1 prompt\(s\), [1-6] new tokens",
                     capsys.readouterr().out, re.S | re.M)


def test_compiled_grouped_experts_multiply_the_local_shards_of_dtensor_weights(tmp_path):
    """Expert parallelism makes the experts' weights DTensors; compiled, the grouped path must still multiply their
    local shards (a plain tensor and a DTensor together are refused by every distributed operator)."""
    experts = GroupedExperts(4, 16, 8)
    for weight in experts.parameters():
        nn.init.normal_(weight, generator=torch.Generator().manual_seed(weight.numel()))
    experts.to(torch.bfloat16).grouped_mm = True  # the grouped kernel's dtype
    x = torch.randn(12, 16, generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16)
    counts = torch.tensor([3, 0, 5, 4])
    eager = experts(x, counts)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for name, weight in list(experts.named_parameters()):
            setattr(experts, name, nn.Parameter(distribute_tensor(weight.detach(), mesh, [Shard(0)])))
        compiled = torch.compile(experts, backend="aot_eager", fullgraph=True)(x, counts)
    finally:
        dist.destroy_process_group()
    assert torch.equal(compiled, eager)
