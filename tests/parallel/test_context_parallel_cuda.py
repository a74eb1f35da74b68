"""Context parallelism's CUDA attention (`PrefixThenDiagonal`, two cuDNN calls merged by log-sum-exp) against one
bottom-right-causal SDPA call over the same keys: outputs and every gradient. Runs where there is a GPU."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from parallel.context_parallel import PrefixThenDiagonal

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN attention needs a CUDA device")


@pytest.mark.parametrize("kv_heads", [8, 2])
@pytest.mark.parametrize("chunk", [1, 3])
def test_prefix_then_diagonal_equals_bottom_right_causal_attention(chunk: int, kv_heads: int) -> None:
    torch.manual_seed(chunk)
    c, heads, head_dim = 256, 8, 64
    keys = (chunk + 1) * c

    def leaves(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16).requires_grad_()

    q, k, v = leaves(2, heads, c, head_dim), leaves(2, kv_heads, keys, head_dim), leaves(2, kv_heads, keys, head_dim)
    grad = torch.randn(2, heads, c, head_dim, device="cuda", dtype=torch.bfloat16)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(c, keys), enable_gqa=True)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    own = slice(keys - c, keys)
    out = PrefixThenDiagonal.apply(q, k[:, :, :keys - c], v[:, :, :keys - c], k[:, :, own], v[:, :, own], None)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    # bf16 kernels that sum in different orders: a few bf16 steps apart at most.
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
