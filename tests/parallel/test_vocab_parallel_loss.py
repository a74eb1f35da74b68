"""The vocabulary-parallel loss over two gloo ranks, each holding half of every row's logits, equals the unsharded
cross-entropy and its gradient, eager and compiled, and keeps for backward no more than the logits it was given."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from parallel.megatron_tp import vocab_parallel_cross_entropy

RANKS, VOCAB = 2, 96
CASES = [(compiled, dtype) for compiled in (False, True) for dtype in (torch.float32, torch.bfloat16)]


def rows(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [2, 8, VOCAB] spread wide enough that a row's maximum sits on one rank, and their labels."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 8, VOCAB, generator=g) * 4).to(dtype), torch.randint(0, VOCAB, (2, 8), generator=g)


def saved_bytes(fn, *args) -> tuple[torch.Tensor, int]:
    """fn(*args)'s result and the bytes of the tensors autograd saved for its backward (each storage once)."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, sum(saved.values())


def rank_losses(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=RANKS)
    results = []
    for compiled, dtype in CASES:
        logits, labels = rows(dtype)
        shard = logits.chunk(RANKS, -1)[rank].clone().requires_grad_()
        loss, saved = saved_bytes(vocab_parallel_cross_entropy, shard, labels, None, compiled)
        loss.backward()
        results.append((loss.detach(), shard.grad, saved, shard.numel() * shard.element_size()))
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> list[list[tuple]]:
    tmp = tmp_path_factory.mktemp("vocab-parallel")
    mp.spawn(rank_losses, (str(tmp / "store"), str(tmp / "out")), nprocs=RANKS)
    return [torch.load(tmp / f"out.{rank}") for rank in range(RANKS)]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{'compiled' if c else 'eager'}-{d}" for c, d in CASES])
def test_sharded_loss_and_gradient_equal_the_whole_rows(sharded: list[list[tuple]], case: int) -> None:
    _, dtype = CASES[case]
    logits, labels = rows(dtype)
    whole = logits.float().requires_grad_()
    want = F.cross_entropy(whole.flatten(0, 1), labels.flatten())
    want.backward()
    tolerance = 1e-6 if dtype == torch.float32 else 1e-3
    for rank, results in enumerate(sharded):
        loss, grad, saved, shard_bytes = results[case]
        torch.testing.assert_close(loss, want.detach(), rtol=1e-6, atol=1e-6)
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.float(), whole.grad.chunk(RANKS, -1)[rank], rtol=0, atol=tolerance)
        rows_bytes = 16 * labels.numel()  # a row's log-normaliser, target index and mask, at most
        assert shard_bytes <= saved <= shard_bytes + rows_bytes, "only the logits and a few numbers a row are kept"


def test_the_gradient_pushes_the_target_logit_up_on_the_rank_that_holds_it(sharded: list[list[tuple]]) -> None:
    logits, labels = rows(torch.float32)
    for rank, results in enumerate(sharded):
        grad = results[0][1]
        local = labels - rank * (VOCAB // RANKS)
        held = (local >= 0) & (local < VOCAB // RANKS)
        at_target = grad.gather(-1, local.clamp(0, VOCAB // RANKS - 1).unsqueeze(-1)).squeeze(-1)
        assert held.any() and (at_target[held] < 0).all()
