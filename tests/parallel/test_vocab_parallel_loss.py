"""The vocabulary-parallel loss, each rank holding a slice of every row's logits, equals the unsharded cross-entropy
and its gradient, eager and compiled, and keeps for backward no more than the logits it was given. On CPU over two
gloo ranks; where there is a GPU, also on it over NCCL (one rank a GPU, up to two), at a realistic vocabulary width,
where the compiled kernels are Triton's."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from parallel.megatron_tp import vocab_parallel_cross_entropy

CASES = [(compiled, dtype) for compiled in (False, True) for dtype in (torch.float32, torch.bfloat16)]
IDS = [f"{'compiled' if c else 'eager'}-{str(d).removeprefix('torch.')}" for c, d in CASES]


@dataclass(frozen=True)
class Setup:
    device: str
    ranks: int
    vocab: int
    tokens: int

    def rows(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [2, tokens, vocab] spread wide enough that a row's maximum sits on one rank, and their labels."""
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(2, self.tokens, self.vocab, generator=g) * 4
        return logits.to(dtype), torch.randint(0, self.vocab, (2, self.tokens), generator=g)


SETUPS = {"cpu": Setup("cpu", 2, 96, 8),
          "cuda": Setup("cuda", min(2, torch.cuda.device_count()), 50304, 256)}


def saved_bytes(fn, *args) -> tuple[torch.Tensor, int]:
    """fn(*args)'s result and the bytes of the tensors autograd saved for its backward (each storage once)."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, sum(saved.values())


def rank_losses(rank: int, setup: Setup, store: str, out: str) -> None:
    cuda = setup.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}", rank=rank,
                            world_size=setup.ranks)
    results = []
    for compiled, dtype in CASES:
        logits, labels = setup.rows(dtype)
        shard = logits.chunk(setup.ranks, -1)[rank].to(setup.device, copy=True).requires_grad_()
        loss, saved = saved_bytes(vocab_parallel_cross_entropy, shard, labels.to(setup.device), None, compiled)
        loss.backward()
        results.append((loss.detach().cpu(), shard.grad.cpu(), saved, shard.numel() * shard.element_size()))
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=list(SETUPS))
def sharded(request, tmp_path_factory) -> tuple[Setup, list[list[tuple]]]:
    setup = SETUPS[request.param]
    if setup.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    tmp = tmp_path_factory.mktemp("vocab-parallel")
    mp.spawn(rank_losses, (setup, str(tmp / "store"), str(tmp / "out")), nprocs=setup.ranks)
    return setup, [torch.load(tmp / f"out.{rank}") for rank in range(setup.ranks)]


@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_sharded_loss_and_gradient_equal_the_whole_rows(sharded: tuple[Setup, list[list[tuple]]], case: int) -> None:
    setup, results = sharded
    _, dtype = CASES[case]
    logits, labels = setup.rows(dtype)
    whole = logits.float().requires_grad_()
    want = F.cross_entropy(whole.flatten(0, 1), labels.flatten())
    want.backward()
    # fp32 gradients are 1/rows-scaled probabilities; bf16 holds 8 bits of each
    tolerance = 1e-6 if dtype == torch.float32 else 2e-3 / labels.numel()
    for rank, (loss, grad, saved, shard_bytes) in enumerate(result[case] for result in results):
        torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-5)
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.float(), whole.grad.chunk(setup.ranks, -1)[rank], rtol=0, atol=tolerance)
        rows_bytes = 16 * labels.numel()  # a row's log-normaliser, target index and mask, at most
        assert shard_bytes <= saved <= shard_bytes + rows_bytes, "only the logits and a few numbers a row are kept"


def test_the_gradient_pushes_the_target_logit_up_on_the_rank_that_holds_it(
        sharded: tuple[Setup, list[list[tuple]]]) -> None:
    setup, results = sharded
    _, labels = setup.rows(torch.float32)
    width = setup.vocab // setup.ranks
    for rank, result in enumerate(results):
        grad = result[0][1]
        local = labels - rank * width
        held = (local >= 0) & (local < width)
        at_target = grad.gather(-1, local.clamp(0, width - 1).unsqueeze(-1)).squeeze(-1)
        assert held.any() and (at_target[held] < 0).all()
