"""Parameter and FLOP counts: published model sizes, the real model's parameters, stage and shard splits."""

from __future__ import annotations

import pytest

from orchestrator.errors import SpecError
from orchestrator.planner.counting import count_params, flops_per_token, stage_params
from orchestrator.validate import load_spec, parse_spec
from parallel.model import build_model

LLAMA3_8B = {"vocab_size": 128256, "dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "ffn_dim": 14336}
LLAMA2_7B = {"vocab_size": 32000, "dim": 4096, "n_layers": 32, "n_heads": 32, "ffn_dim": 11008}


@pytest.mark.parametrize(("model", "published"), [(LLAMA3_8B, 8_030_261_248), (LLAMA2_7B, 6_738_415_616)])
def test_published_sizes(model, published):
    assert count_params(parse_spec({"model": model}).model).total == published


@pytest.mark.parametrize("tied", [False, True])
def test_matches_the_real_model(tied):
    spec = parse_spec({"model": {"vocab_size": 384, "dim": 96, "n_layers": 3, "n_heads": 6, "n_kv_heads": 2,
                                 "multiple_of": 32, "tie_embeddings": tied}})
    model = build_model(spec.model)  # meta device: shapes only
    real = sum(p.numel() for p in model.parameters())  # a tied weight is counted once
    assert count_params(spec.model).total == real


def test_stages_and_shards_add_up():
    spec = parse_spec({"model": {"vocab_size": 1024, "dim": 128, "n_layers": 8, "n_heads": 8, "n_kv_heads": 4}})
    count = count_params(spec.model)
    assert sum(stage_params(spec.model, pp=4)) == count.total
    per_stage = stage_params(spec.model, pp=2, tp=4)
    replicated_norms = (count.n_layers * count.norms + count.final_norm) * (4 - 1)
    assert 4 * sum(per_stage) == count.total + replicated_norms
    assert per_stage[0] > per_stage[1] - count.output // 4  # the embedding sits on the first stage


def test_tied_embedding_is_held_by_first_and_last_stage():
    spec = parse_spec({"model": {"vocab_size": 1024, "dim": 64, "n_layers": 4, "tie_embeddings": True}})
    count = count_params(spec.model)
    assert sum(stage_params(spec.model, pp=2)) == count.total + count.embedding
    assert sum(stage_params(spec.model, pp=1)) == count.total


def test_flops_count_matmuls_and_attention():
    spec = parse_spec({"model": LLAMA3_8B})
    count = count_params(spec.model)
    attention = 12 * 32 * 4096 * 8192
    assert flops_per_token(spec.model, 8192) == 6 * (count.total - count.embedding) + attention


def test_unknown_vocab_names_the_field(repo_root):
    spec = load_spec(repo_root / "examples" / "tiny.yaml", ["data.path=/nonexistent/shards"])
    with pytest.raises(SpecError, match=r"model.vocab_size: not set, and no shards at data.path"):
        count_params(spec.model)
