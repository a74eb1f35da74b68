"""The model alone: Hugging Face names, grouped-query attention, KV-cache decoding, FLOP count, initialisation."""

from __future__ import annotations

import pytest
import torch

from orchestrator.spec import ModelConfig
from parallel.model import ModelDims, cross_entropy, init_parameter
from tests.helpers import CONFIG, tiny


def test_parameter_names_are_hugging_face_llama_names() -> None:
    names = {n for n, _ in tiny().named_parameters()}
    expected = {"embed_tokens.weight", "norm.weight", "lm_head.weight"} | {
        f"layers.{i}.{p}.weight" for i in range(2) for p in (
            "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
            "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert names == expected


def test_shapes_follow_grouped_query_attention_and_ffn_rounding() -> None:
    model = tiny()
    attn = model.layers[0].self_attn
    assert attn.k_proj.weight.shape == (2 * 16, 64) and attn.q_proj.weight.shape == (64, 64)
    assert model.layers[0].mlp.gate_proj.weight.shape == (192, 64)  # 8/3·64 = 170 → 192 (multiple of 32)
    assert model.dims.num_params() == sum(p.numel() for p in model.parameters())


def test_tied_embeddings_share_one_tensor() -> None:
    model = tiny(tie=True)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.dims.num_params() == sum(p.numel() for p in model.parameters())


def test_decoding_with_a_kv_cache_matches_the_full_forward() -> None:
    model = tiny()
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    full = model(tokens)
    caches = model.new_caches(batch=2, max_len=12)
    parts = [model(tokens[:, :7], caches)] + [model(tokens[:, i:i + 1], caches) for i in range(7, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_attention_is_causal() -> None:
    model = tiny()
    tokens = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(1))
    changed = tokens.clone()
    changed[0, 6] = (changed[0, 6] + 1) % 96
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_initial_loss_is_near_uniform() -> None:
    model = tiny()
    tokens = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(2))
    loss = cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
    assert abs(loss.item() - torch.log(torch.tensor(96.0)).item()) < 0.1


def test_init_is_a_function_of_name_and_seed() -> None:
    dims = ModelDims.from_config(CONFIG)
    a = init_parameter("layers.1.mlp.up_proj.weight", (8, 8), dims, seed=5)
    assert torch.equal(a, init_parameter("layers.1.mlp.up_proj.weight", (8, 8), dims, seed=5))
    assert not torch.equal(a, init_parameter("layers.0.mlp.up_proj.weight", (8, 8), dims, seed=5))
    assert not torch.equal(a, init_parameter("layers.1.mlp.up_proj.weight", (8, 8), dims, seed=6))
    assert torch.equal(init_parameter("norm.weight", (8,), dims, seed=5), torch.ones(8))
    residual = init_parameter("layers.0.mlp.down_proj.weight", (256, 256), dims, seed=5)
    assert residual.std().item() == pytest.approx(0.02 / 2, rel=0.05)  # 1/sqrt(2·n_layers)


def test_flops_per_token_is_6n_plus_attention() -> None:
    dims = ModelDims.from_config(CONFIG)
    n = dims.num_params(with_embeddings=False) + 96 * 64
    assert dims.flops_per_token(128) == 6 * n + 12 * 2 * 128 * 64


def test_an_unresolved_vocab_size_is_refused() -> None:
    with pytest.raises(ValueError, match="model.vocab_size must be resolved"):
        ModelDims.from_config(ModelConfig())
