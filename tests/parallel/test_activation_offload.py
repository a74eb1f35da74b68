"""Activation offload moves exactly the blocks' inputs out of the forward and back into the backward, under full
and selective checkpointing, and the gradients are those without it, eager and compiled. One process: on CPU, where
the copies are plain copies, bit for bit; where there is a GPU, also on it, through pinned memory and the side
streams, compiled by inductor, to within the nondeterminism of CUDA's atomic adds (`parallel.activation_offload`). The
engine runs it under dp2 in test_native_engine, and the validator's refusals are in
tests/orchestrator/test_spec_activation_checkpointing.py."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from orchestrator.spec import ModelConfig
from parallel.activation_checkpoint import apply_activation_checkpointing
from parallel.activation_offload import LAG, PREFETCH, ActivationOffload
from parallel.compile import apply_compile
from parallel.model import build_model, cross_entropy

CONFIG = ModelConfig(vocab_size=96, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, multiple_of=32)
MICRO_BATCHES, ROWS, SEQ = 2, 2, 24


def train(compiled: bool, offload: bool, device: str = "cpu", mode: str = "full") -> tuple[
        dict[str, torch.Tensor], ActivationOffload | None, list[int]]:
    """Gradients of two micro-batches under checkpointing `mode`, the offload that ran (None: without), and how many
    tensors each forward's end brought back for the backward's first blocks."""
    torch._dynamo.reset()
    model = build_model(CONFIG, device)
    model.init_weights(seed=5)
    apply_activation_checkpointing(model.layers, mode)
    if compiled:
        apply_compile(model.layers, backend="inductor" if device == "cuda"
                      else CompileCounterWithBackend("aot_eager_decomp_partition"))
    moved = ActivationOffload(model, torch.device(device)) if offload else None
    g = torch.Generator().manual_seed(3)
    brought_back = []
    for _ in range(MICRO_BATCHES):
        tokens = torch.randint(0, CONFIG.vocab_size, (ROWS, SEQ + 1), generator=g).to(device)
        if moved is None:
            logits = model(tokens[:, :-1])
        else:
            restored = moved.restored
            with moved.forward():
                logits = model(tokens[:, :-1])
            brought_back.append(moved.restored - restored)
        cross_entropy(logits, tokens[:, 1:]).backward()
    with torch.no_grad():
        model(tokens[:, :-1])  # a forward outside the offload's moves nothing
    return {n: p.grad.cpu() for n, p in model.named_parameters()}, moved, brought_back


def assert_same_gradients(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], device: str) -> None:
    assert got.keys() == want.keys()
    for name in want:
        if device == "cpu":
            assert torch.equal(got[name], want[name]), name
        else:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_offload_moves_each_block_input_out_and_back_and_trains_as_without_it(mode: str, compiled: bool,
                                                                              device: str) -> None:
    want, _, _ = train(compiled, offload=False, device=device, mode=mode)
    got, moved, brought_back = train(compiled, offload=True, device=device, mode=mode)
    blocks = MICRO_BATCHES * CONFIG.n_layers
    kept = MICRO_BATCHES * LAG
    assert (moved.offloaded, moved.kept, moved.restored) == (blocks, kept, blocks - kept), \
        "each block's input out once, and back once unless it is among the last, which backward reads first"
    assert brought_back == [PREFETCH - LAG] * MICRO_BATCHES, \
        "the forward's end brings back what the backward reads first, unless it is still on the device"
    assert moved.offloaded_bytes == blocks * ROWS * SEQ * CONFIG.dim * 4
    assert_same_gradients(got, want, device)


def test_blocks_saving_several_residual_tensors_move_them_a_block_at_a_time() -> None:
    """Eager and without checkpointing a block saves several tensors of the residual's shape (as tensor
    parallelism's kept reductions do under selective): the lag and the prefetch count blocks of them, once a forward
    has shown how many a block saves; the first forward lets each tensor's copy lag by one tensor."""
    want, _, _ = train(compiled=False, offload=False, mode="none")
    got, moved, brought_back = train(compiled=False, offload=True, mode="none")
    per_block, rest = divmod(moved.offloaded, MICRO_BATCHES * CONFIG.n_layers)
    assert rest == 0 and per_block > 1, moved.offloaded
    kept = LAG + LAG * per_block
    assert (moved.kept, moved.restored) == (kept, moved.offloaded - kept), (moved.kept, moved.restored)
    assert brought_back == [PREFETCH * per_block - LAG, (PREFETCH - LAG) * per_block], brought_back
    assert_same_gradients(got, want, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_forward_holds_no_more_block_inputs_on_the_gpu_than_the_copies_in_flight_and_the_last_ones() -> None:
    config = dataclasses.replace(CONFIG, dim=256, n_layers=10)
    rows, seq = 2, 8192
    model = build_model(config, "cuda")
    model.init_weights(seed=5)
    apply_activation_checkpointing(model.layers, "full")
    tokens = torch.randint(0, config.vocab_size, (rows, seq + 1), device="cuda")

    def forward_peak(offload: ActivationOffload | None) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with offload.forward() if offload else contextlib.nullcontext():
            logits = model(tokens[:, :-1])
        peak = torch.cuda.max_memory_allocated() - before
        cross_entropy(logits, tokens[:, 1:]).backward()
        model.zero_grad(set_to_none=True)
        return peak

    block_input = rows * seq * config.dim * 4
    forward_peak(None)  # the allocator's first blocks, outside either measure
    without = forward_peak(None)
    with_offload = forward_peak(ActivationOffload(model, torch.device("cuda")))
    assert without - with_offload >= (config.n_layers - PREFETCH - LAG - 1) * block_input, (without, with_offload)
