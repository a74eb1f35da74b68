"""Parameter and FLOP counts: published model sizes, the real model's parameters, stage and shard splits."""

from __future__ import annotations

import pytest

from orchestrator.cli import main
from orchestrator.errors import SpecError
from orchestrator.planner.counting import attention_widths, count_params, flops_per_token, stage_params
from orchestrator.presets import SIZES
from orchestrator.validate import load_spec, parse_spec
from parallel.megatron_tp import apply_tensor_parallel
from parallel.model import ModelDims, build_model

LLAMA3_8B = {"vocab_size": 128256, "dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "ffn_dim": 14336}
LLAMA2_7B = {"vocab_size": 32000, "dim": 4096, "n_layers": 32, "n_heads": 32, "ffn_dim": 11008}


@pytest.mark.parametrize(("model", "published"), [(LLAMA3_8B, 8_030_261_248), (LLAMA2_7B, 6_738_415_616)])
def test_published_sizes(model, published):
    assert count_params(parse_spec({"model": model}).model).total == published


# Totals the publishers state (model cards, safetensors metadata), against our count of the preset.
PUBLISHED = [("qwen3", "0.6b", 0.596e9), ("llama3", "1b", 1.236e9), ("llama3", "8b", 8.03e9),
             ("mistral", "7b", 7.24e9), ("gemma2", "2b", 2.61e9), ("qwen2", "0.5b", 0.494e9), ("olmo2", "7b", 7.30e9)]


def preset_spec(family: str, size: str, seq_len: int = 1024):
    return parse_spec({"model": {"family": family, "size": size}, "data": {"seq_len": seq_len}})


def real_params(model) -> int:
    """Parameters of the model itself, built on the meta device; a tied weight is one parameter, counted once."""
    return sum(p.numel() for p in build_model(model).parameters())


@pytest.mark.parametrize(("family", "size"), [(f, s) for f, sizes in SIZES.items() for s in sizes])
def test_every_preset_counts_as_the_model(family, size):
    spec = preset_spec(family, size)
    count = count_params(spec.model)
    dims = ModelDims.from_config(spec.model)
    assert count.total == real_params(spec.model) == dims.num_params()
    tied_copy = count.embedding if spec.model.tie_embeddings else 0  # the last stage's copy of the tied weight
    assert sum(stage_params(spec.model, pp=2)) == count.total + tied_copy
    assert flops_per_token(spec.model, 1024) == dims.flops_per_token(1024)
    # 6 FLOPs per matmul weight (the lm_head too, tied or not) and attention's 12·seen keys·query width per layer
    q, _ = attention_widths(spec.model)
    seen = sum(min(1024, dims.window(i) or 1024) for i in range(count.n_layers))
    assert flops_per_token(spec.model, 1024) == 6 * (count.non_embedding + count.embedding) + 12 * seen * q


@pytest.mark.parametrize(("family", "size", "published"), PUBLISHED)
def test_presets_have_the_published_sizes(family, size, published):
    assert count_params(preset_spec(family, size).model).total == pytest.approx(published, rel=0.005)


@pytest.mark.parametrize("switches", [
    {"qkv_bias": True}, {"qk_norm": "head"}, {"qk_norm": "full"}, {"norm_placement": "post"},
    {"norm_placement": "sandwich", "activation": "gelu_tanh"}, {"head_dim": 48}, {"head_dim": 8, "qk_norm": "full"},
    {"tie_embeddings": True, "qkv_bias": True, "qk_norm": "head", "norm_placement": "sandwich", "head_dim": 20},
])
def test_each_switch_counts_as_the_model(switches):
    spec = parse_spec({"model": {"vocab_size": 256, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                 "multiple_of": 32, **switches}})
    assert count_params(spec.model).total == real_params(spec.model)
    assert stage_params(spec.model, tp=2) == [tp_rank_params(spec.model, 2)]


def tp_rank_params(model, tp: int) -> int:
    """Parameters one rank holds of the model split over `tp` ranks by the Megatron-style layers (meta device:
    building the sharded layers needs no process group)."""
    return sum(p.numel() for p in apply_tensor_parallel(build_model(model), None, 0, tp).parameters())


@pytest.mark.parametrize(("family", "size"), [("qwen2", "0.5b"), ("qwen3", "0.6b"), ("olmo2", "1b"),
                                              ("gemma2", "2b"), ("llama3", "1b")])
def test_tp_shards_count_as_the_sharded_model(family, size):
    model = preset_spec(family, size).model
    assert stage_params(model, tp=2) == [tp_rank_params(model, 2)]


def test_plan_prints_a_presets_counts(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text("name: small-gemma\nmodel: {family: gemma2, size: 2b}\nresources: {gpus_per_node: 8}\n")
    assert main(["plan", str(path), "--gpu-mem", "141GiB", "--top", "1"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    block = sum(p.numel() for p in build_model(preset_spec("gemma2", "2b").model).layers[0].parameters())
    assert first.startswith(f"small-gemma (gemma2 2b): 2.61B parameters (embedding 590M, 26 blocks × "
                            f"{block / 1e6:.3g}M, output tied)")


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
