"""Context parallelism's CUDA attention (`cudnn_chunk_attention`: a later chunk's two cuDNN calls merged by
log-sum-exp in one operator) against one bottom-right-causal SDPA call over the same keys: outputs and every gradient,
eager, compiled as one graph (`fullgraph=True`: no break), and compiled inside activation checkpointing, with the
queries, keys and values laid out as the model hands them over. Runs where there is a GPU."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from torch.utils.checkpoint import checkpoint

from parallel.cudnn_attention import cudnn_chunk_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN attention needs a CUDA device")


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
