"""`parallel.loss_chunks`: the head and loss a slice of the row at a time give the loss and the gradients of the whole
row at once, eager and with the loss compiled, with and without autograd; on a GPU the step's peak drops by most of
the logits. The engine runs it under FSDP, tp2 with sequence parallelism and cp2 × tp2 in test_native_engine and
test_context_parallel."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from orchestrator.spec import ModelConfig
from parallel.chunked_loss import chunked_loss
from parallel.model import build_model, cross_entropy

CONFIG = ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, logit_softcap=5.0)
ROWS, SEQ = 2, 24


def loss_and_grads(chunks: int, compiled: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradients of one micro-batch, whole (chunks=0) or over `chunks` slices."""
    torch._dynamo.reset()
    model = build_model(CONFIG, "cpu")
    model.init_weights(seed=5)
    tokens = torch.randint(0, CONFIG.vocab_size, (ROWS, SEQ + 1), generator=torch.Generator().manual_seed(3))
    loss_fn = torch.compile(cross_entropy, backend=CompileCounterWithBackend("aot_eager")) if compiled \
        else cross_entropy
    if chunks:
        loss = chunked_loss(model.head, loss_fn, model(tokens[:, :-1], head=False), tokens[:, 1:], chunks)
    else:
        loss = loss_fn(model(tokens[:, :-1]), tokens[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("chunks", [1, 3, 8])
def test_slices_give_the_whole_rows_loss_and_gradients(chunks: int, compiled: bool) -> None:
    want_loss, want = loss_and_grads(0)
    got_loss, got = loss_and_grads(chunks, compiled)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_without_autograd_the_slices_give_the_whole_rows_loss() -> None:
    model = build_model(CONFIG, "cpu")
    model.init_weights(seed=5)
    tokens = torch.randint(0, CONFIG.vocab_size, (ROWS, SEQ + 1), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        whole = cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
        sliced = chunked_loss(model.head, cross_entropy, model(tokens[:, :-1], head=False), tokens[:, 1:], 4)
    torch.testing.assert_close(sliced, whole, rtol=1e-6, atol=1e-6)


def test_slices_that_do_not_divide_the_row_are_refused() -> None:
    h, targets = torch.zeros(ROWS, SEQ, CONFIG.dim), torch.zeros(ROWS, SEQ, dtype=torch.long)
    with pytest.raises(ValueError, match=r"24 tokens a row on this rank \(of 24, over 1 sequence shards\) do not "
                                         r"split into 5 equal slices"):
        chunked_loss(torch.nn.Identity(), cross_entropy, h, targets, 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_step_holds_one_slices_logits_instead_of_all() -> None:
    config = dataclasses.replace(CONFIG, vocab_size=32768, logit_softcap=None)
    model = build_model(config, "cuda")
    model.init_weights(seed=5)
    tokens = torch.randint(0, config.vocab_size, (ROWS, 4097), device="cuda")

    def step_peak(chunks: int) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        if chunks:
            loss = chunked_loss(model.head, cross_entropy, model(tokens[:, :-1], head=False), tokens[:, 1:], chunks)
        else:
            loss = cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        model.zero_grad(set_to_none=True)
        return torch.cuda.max_memory_allocated() - before

    logits = ROWS * 4096 * config.vocab_size * 4
    step_peak(0)
    whole, sliced = step_peak(0), step_peak(8)
    assert whole - sliced >= logits, (whole, sliced)
