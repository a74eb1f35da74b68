"""Context parallelism's CUDA attention (`cudnn_chunk_attention`: a later chunk's two cuDNN calls merged by
log-sum-exp in one operator) against one bottom-right-causal SDPA call over the same keys: outputs and every gradient,
eager, compiled as one graph (`fullgraph=True`: no break), and compiled inside activation checkpointing, with the
queries, keys and values laid out as the model hands them over; and a cp rank's FlexAttention document masks (its
split's queries against every rank's keys) against the whole row's. Runs where there is a GPU."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from torch.utils.checkpoint import checkpoint

from orchestrator.validate import parse_spec
from parallel.context_parallel import chunk_attention
from parallel.cudnn_attention import cudnn_chunk_attention
from parallel.documents import balanced_positions, block_mask, compiled_flex_attention, dense_mask, document_ids
from parallel.model import build_model, cross_entropy
from tests.parallel.layout_worker import EOS, TINY

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def checkpointed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    return checkpoint(cudnn_chunk_attention, q, k, v, scale, use_reentrant=False)


RUNS = {"eager": cudnn_chunk_attention, "compiled": torch.compile(cudnn_chunk_attention, fullgraph=True),
        "compiled-checkpointed": torch.compile(checkpointed, fullgraph=True)}


@pytest.mark.parametrize("run", list(RUNS))
@pytest.mark.parametrize("kv_heads", [8, 2])
@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("gathered", [False, True])
def test_cudnn_chunk_attention_equals_bottom_right_causal_attention(gathered: bool, chunk: int, kv_heads: int,
                                                                   run: str) -> None:
    torch.manual_seed(chunk)
    c, heads, head_dim = 256, 8, 64
    keys = (chunk + 1) * c

    def leaves(length: int, n_heads: int, view: bool = True) -> torch.Tensor:
        # [batch, heads, seq, head_dim] views of [batch, seq, heads, head_dim], as the model's projections give;
        # gathered keys and values are fresh [batch, heads, seq, head_dim] tensors
        if not view:
            return torch.randn(2, n_heads, length, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        x = torch.randn(2, length, n_heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        return x.transpose(1, 2)

    q, k, v = leaves(c, heads), leaves(keys, kv_heads, not gathered), leaves(keys, kv_heads, not gathered)
    grad = torch.randn(2, heads, c, head_dim, device="cuda", dtype=torch.bfloat16)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(c, keys), enable_gqa=True)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    out = RUNS[run](q, k, v, None)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    # bf16 kernels that sum in different orders: a few bf16 steps apart at most.
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)


@pytest.fixture
def group_of_one():
    """A one-process NCCL group: a cp rank's attention gathers over it, so both chunks run here."""
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize("extra", [[], ["model.attn_softcap=20", "model.sliding_window=96",
                                        "model.full_attention_every=2"]], ids=["llama", "gemma-like"])
def test_chunked_document_masks_give_the_whole_rows_numbers(group_of_one, extra: list[str]) -> None:
    """Per-document masks as a cp rank builds them on CUDA (one FlexAttention block mask of its split's queries
    against the gathered keys, at their row positions) against one block mask over the whole row: logits and every
    gradient, fp32, documents crossing the chunks' borders."""
    spec = parse_spec(TINY, overrides=["data.seq_len=512", "model.attention_mask=document",
                                       "model.rope_positions=document", *extra])
    rows = torch.randint(1, spec.model.vocab_size, (2, 513), generator=torch.Generator().manual_seed(3))
    rows[0, [100, 250, 300]] = rows[1, [40, 380]] = EOS
    rows = rows.cuda()
    documents = document_ids(rows[:, :-1], EOS)
    results = []
    for chunked in (False, True):
        model = build_model(spec.model, "cuda")
        model.init_weights(seed=0)
        if chunked:
            chunk_attention(model, list(model.layers), 1, 0, group_of_one, spec.data.seq_len)
        logits = model(rows[:, :-1], documents=documents)
        cross_entropy(logits, rows[:, 1:]).backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("window", [0, 96])
def test_a_ranks_block_mask_attends_as_its_dense_mask(window: int) -> None:
    """The FlexAttention block mask of a cp2 rank's balanced split (queries and keys out of row order, tiles skipped)
    against SDPA under the boolean mask of the same positions: outputs and gradients."""
    g = torch.Generator(device="cuda").manual_seed(1)
    rows = torch.randint(1, 50, (2, 2048), device="cuda", generator=g)
    rows[0, [300, 301, 900, 1500]] = rows[1, [1000]] = EOS
    documents = document_ids(rows, EOS)
    every = balanced_positions(documents, 2)
    queries, keys = every[:, 1], every.flatten(1)

    def leaf(heads: int, length: int) -> torch.Tensor:
        return torch.randn(2, heads, length, 64, device="cuda", generator=g, requires_grad=True)

    q, k, v = leaf(8, 1024), leaf(2, 2048), leaf(2, 2048)
    grad = torch.randn(2, 8, 1024, 64, device="cuda", generator=g)
    got = compiled_flex_attention()(q, k, v, block_mask=block_mask(documents, window, queries, keys), enable_gqa=True)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(documents, window, queries, keys),
                                          enable_gqa=True)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad),
                    strict=True):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)
