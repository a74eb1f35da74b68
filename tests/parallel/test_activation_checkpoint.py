"""Every activation checkpointing mode trains exactly as none does, eager and compiled, and recomputes what it says.

One process, fp32, a 3-block model: losses and gradients are held to the no-checkpointing run within the layout
tests' tolerances (1e-5 relative on losses, 1e-5 absolute on parameters, here on gradients). Compiled runs use
`aot_eager_decomp_partition`: dynamo and AOTAutograd's min-cut partitioner as inductor has them (the partitioner is
where checkpointing under compile happens), without inductor's C++ build, so the test stays quick on CPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils._python_dispatch import TorchDispatchMode

from orchestrator.spec import ModelConfig, MoEConfig
from parallel.activation_checkpoint import MODES, apply_activation_checkpointing
from parallel.compile import apply_compile
from parallel.context_parallel import chunk_attention
from parallel.expert_parallel import dispatch_over, moe_experts
from parallel.model import build_model, cross_entropy

CONFIG = ModelConfig(vocab_size=96, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, multiple_of=32)
# Checkpointing recomputes a block's forward only as far as backward needs it (non-reentrant checkpoint's early
# stop), and down_proj's output is only added to the residual stream: full recomputes q, k, v, o, gate and up;
# selective keeps every other matmul (q, v, gate) and recomputes k, o and up.
FULL_RECOMPUTED_PER_BLOCK = 6
SELECTIVE_RECOMPUTED_PER_BLOCK = 3
RTOL = 1e-5
GRAD_ATOL = 1e-5


def tokens() -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (2, 25), generator=torch.Generator().manual_seed(3))


def model_with(mode: str, backend: object | None = None, every: int = 2) -> torch.nn.Module:
    model = build_model(CONFIG, "cpu")
    model.init_weights(seed=5)
    apply_activation_checkpointing(model.layers, mode, every)
    if backend is not None:
        apply_compile(model.layers, backend=backend)
    return model


def loss_and_grads(model: torch.nn.Module, rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = cross_entropy(model(rows[:, :-1]), rows[:, 1:])
    loss.backward()
    return loss.detach(), {n: q.grad.clone() for n, q in model.named_parameters()}


def assert_same_training(mode: str, reference: torch.nn.Module, model: torch.nn.Module) -> None:
    rows = tokens()
    want_loss, want_grads = loss_and_grads(reference, rows)
    got_loss, got_grads = loss_and_grads(model, rows)
    torch.testing.assert_close(got_loss, want_loss, rtol=RTOL, atol=0)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        assert grad.abs().max() > 0, f"{name}: a zero gradient proves nothing"
        torch.testing.assert_close(got_grads[name], grad, rtol=0, atol=GRAD_ATOL,
                                   msg=lambda m, n=name: f"{mode} {n}: {m}")


@pytest.mark.parametrize("mode", ["full", "selective", "every_n"])
def test_eager_checkpointing_matches_no_checkpointing(mode: str) -> None:
    assert_same_training(mode, model_with("none"), model_with(mode))


@pytest.mark.parametrize("mode", ["full", "selective", "every_n"])
def test_compiled_blocks_capture_the_checkpointed_region(mode: str) -> None:
    """A compiled block must compile: before, a checkpointed block ran eagerly under its compile wrapper."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counter = CompileCounterWithBackend("aot_eager_decomp_partition")
    assert_same_training(mode, model_with("none"), model_with(mode, backend=counter))
    assert counter.frame_count >= 1 and counter.op_count >= 1, f"{mode}: no block was compiled"
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    torch._dynamo.reset()


class OpCounter(TorchDispatchMode):
    """How many times any of `ops` runs."""

    def __init__(self, *ops: torch._ops.OpOverload) -> None:
        super().__init__()
        self.ops = ops
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.ops
        return func(*args, **(kwargs or {}))


def backward_ops(model: torch.nn.Module, *ops: torch._ops.OpOverload) -> int:
    rows = tokens()
    loss = cross_entropy(model(rows[:, :-1]), rows[:, 1:])
    with OpCounter(*ops) as counter:
        loss.backward()
    return counter.count


def backward_matmuls(mode: str, every: int = 2) -> int:
    return backward_ops(model_with(mode, every=every), torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
                        torch.ops.aten.bmm.default)


def test_full_recomputes_every_matmul_and_selective_every_other() -> None:
    plain = backward_matmuls("none")
    assert backward_matmuls("full") == plain + CONFIG.n_layers * FULL_RECOMPUTED_PER_BLOCK
    assert backward_matmuls("selective") == plain + CONFIG.n_layers * SELECTIVE_RECOMPUTED_PER_BLOCK


@pytest.mark.parametrize("every", [1, 2, 3, 4])
def test_every_n_runs_exactly_every_nth_block_again(every: int) -> None:
    """torchtitan's convention: counting blocks from 1, the n-th, 2n-th, … are checkpointed, and only they run
    their attention a second time in backward."""
    model = model_with("every_n", every=every)
    calls = [0] * CONFIG.n_layers
    for i, block in enumerate(model.layers):
        block.self_attn.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    rows = tokens()
    cross_entropy(model(rows[:, :-1]), rows[:, 1:]).backward()
    recomputed = [i for i, n in enumerate(calls) if n == 2]
    assert recomputed == list(range(every - 1, CONFIG.n_layers, every))
    assert all(n in (1, 2) for n in calls), calls
    assert backward_matmuls("every_n", every) == backward_matmuls("none") \
        + len(recomputed) * FULL_RECOMPUTED_PER_BLOCK


def test_every_n_of_one_recomputes_as_full_does() -> None:
    assert backward_matmuls("every_n", every=1) == backward_matmuls("full")


def test_parameter_names_are_the_same_in_every_mode() -> None:
    names = [list(model_with(mode).state_dict()) for mode in MODES]
    assert all(n == names[0] for n in names[1:])
    assert "layers.0.self_attn.q_proj.weight" in names[0]


def test_an_unknown_mode_is_refused_with_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="'partial'; allowed: none, full, selective, every_n"):
        apply_activation_checkpointing(build_model(CONFIG, "meta").layers, "partial")


def test_every_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="every 0 blocks; allowed: 1 or more"):
        apply_activation_checkpointing(build_model(CONFIG, "meta").layers, "every_n", 0)


def gathers(graph: torch.fx.GraphModule) -> int:
    return sum(node.target is torch.ops._c10d_functional.all_gather_into_tensor.default for node in graph.graph.nodes)


@pytest.mark.parametrize(("mode", "gathered_again"), [("full", 2), ("selective", 0)])
def test_compiled_full_checkpointing_gathers_the_keys_and_values_again_and_selective_keeps_them(
        mode: str, gathered_again: int, tmp_path) -> None:
    """Under compile the partitioner keeps every collective's output unless the checkpointed region says to
    recompute it: context parallelism's gathered keys and values would stay from forward to backward, a whole
    sequence's per block. Full checkpointing gathers them again (two per block, in backward); selective keeps them,
    as it keeps every collective's output, and sends nothing again (the planner counts both: the traffic of one,
    the memory of the other). The backward graphs are AOTAutograd's, split by inductor's partitioner."""
    backwards: list[torch.fx.GraphModule] = []

    def keep_backward(graph: torch.fx.GraphModule, _: object) -> object:
        backwards.append(graph)
        return make_boxed_func(graph.forward)

    backend = aot_autograd(fw_compiler=lambda graph, _: make_boxed_func(graph.forward), bw_compiler=keep_backward,
                           partition_fn=min_cut_rematerialization_partition)
    rows = tokens()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        torch._dynamo.reset()
        model = build_model(CONFIG, "cpu")
        model.init_weights(seed=5)
        chunk_attention(model, list(model.layers), 1, 0, dist.group.WORLD, rows.shape[1] - 1)
        apply_activation_checkpointing(model.layers, mode)
        apply_compile(model.layers, backend=backend)
        cross_entropy(model(rows[:, :-1]), rows[:, 1:]).backward()
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()
    assert backwards, "no block was compiled"
    assert [gathers(graph) for graph in backwards] == [gathered_again] * len(backwards)


@pytest.mark.parametrize(("mode", "exchanged_again"), [("none", 0), ("full", 3), ("selective", 0)])
def test_expert_parallelism_exchanges_again_only_in_blocks_recomputed_whole(
        mode: str, exchanged_again: int, tmp_path) -> None:
    """An MoE layer under expert parallelism exchanges its per-expert counts, then sends its tokens to their experts
    and back: three all-to-alls a layer, which full checkpointing runs again in backward and selective keeps (the
    planner counts the traffic of one, the memory of the other). The backward's own are the tokens' gradients, two a
    layer. One gloo rank is a whole ep group; training is the same as without checkpointing."""
    config = dataclasses.replace(CONFIG, moe=MoEConfig(num_experts=4, top_k=2))

    def expert_parallel(checkpointing: str) -> torch.nn.Module:
        model = build_model(config, "cpu")
        model.init_weights(seed=5)
        for experts in moe_experts(list(model.layers)):
            dispatch_over(experts, dist.group.WORLD)
        apply_activation_checkpointing(model.layers, checkpointing)
        return model

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        a2a = torch.ops._c10d_functional.all_to_all_single.default
        assert backward_ops(expert_parallel(mode), a2a) == config.n_layers * (2 + exchanged_again)
        assert_same_training(mode, expert_parallel("none"), expert_parallel(mode))
    finally:
        dist.destroy_process_group()
