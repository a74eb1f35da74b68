"""Model presets: what `model.family` / `model.size` fill, what wins over them, and the rules of the model switches."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.errors import CheckpointError, SpecError
from orchestrator.presets import FAMILIES, SIZES
from orchestrator.spec import spec_to_yaml
from orchestrator.validate import parse_spec, spec_to_dict

PRESETS = [(family, size) for family, sizes in SIZES.items() for size in sizes]


def model_of(**model):
    return parse_spec({"model": model}).model


@pytest.mark.parametrize(("family", "size"), PRESETS)
def test_resolved_spec_round_trips(family, size):
    spec = parse_spec({"model": {"family": family, "size": size}})
    assert parse_spec(spec_to_dict(spec)) == spec
    assert parse_spec(yaml.safe_load(spec_to_yaml(spec))) == spec  # what `pretrain validate` prints


@pytest.mark.parametrize(("family", "config", "size", "names"), [
    # transformers' config classes default to these published checkpoints' shapes
    ("gemma2", "Gemma2Config", "2b", ["attn_scale_dim:query_pre_attn_scalar", "head_dim", "sliding_window",
                                      "attn_softcap:attn_logit_softcapping", "logit_softcap:final_logit_softcapping",
                                      "max_positions:max_position_embeddings", "norm_eps:rms_norm_eps"]),
    ("mistral", "MistralConfig", "7b", ["sliding_window", "n_kv_heads:num_key_value_heads"]),
    ("llama2", "LlamaConfig", "7b", []),
])
def test_sizes_match_transformers_defaults(family, config, size, names):
    transformers = pytest.importorskip("transformers")
    hf = getattr(transformers, config)()
    model = model_of(family=family, size=size)
    pairs = ["vocab_size", "dim:hidden_size", "n_layers:num_hidden_layers", "n_heads:num_attention_heads",
             "ffn_dim:intermediate_size", *names]
    for pair in pairs:
        ours, _, theirs = pair.partition(":")
        assert getattr(model, ours) == getattr(hf, theirs or ours), pair


def test_family_alone_fills_switches_not_dimensions():
    model = model_of(family="gemma2", dim=256, n_heads=4)
    assert (model.activation, model.norm_placement, model.attn_softcap, model.tie_embeddings) == (
        "gelu_tanh", "sandwich", 50.0, True)
    assert model.dim == 256 and model.head_dim is None and model.n_layers == model_of().n_layers


def test_custom_changes_nothing():
    assert model_of(family="custom") == model_of()


def test_explicit_field_beats_preset():
    model = model_of(family="qwen3", size="0.6b", n_layers=14, head_dim=None, tie_embeddings=False)
    assert (model.n_layers, model.head_dim, model.tie_embeddings) == (14, None, False)
    assert model.dim == 1024 and model.qk_norm == "head"


def test_override_beats_preset_and_spec():
    raw = {"model": {"family": "llama3", "size": "8b", "n_layers": 16}}
    spec = parse_spec(raw, overrides=["model.dim=2048", "model.n_layers=8", "model.rope_scaling.factor=16"])
    m = spec.model
    assert (m.dim, m.n_layers, m.n_heads) == (2048, 8, 32)
    assert (m.rope_scaling.type, m.rope_scaling.factor, m.rope_scaling.high_freq_factor) == ("llama3", 16.0, 4.0)


def test_family_and_size_from_overrides():
    spec = parse_spec({"model": {"family": "qwen3", "size": "8b"}}, overrides=["model.family=qwen2",
                                                                               "model.size=0.5b"])
    assert (spec.model.dim, spec.model.qkv_bias, spec.model.qk_norm) == (896, True, "none")


def test_rope_section_of_another_type_takes_nothing_from_the_preset():
    model = model_of(family="llama3", size="1b", rope_scaling={"type": "none"})
    assert model.rope_scaling == type(model.rope_scaling)()
    spec = parse_spec({"model": {"family": "llama3", "size": "1b"}}, overrides=["model.rope_scaling.type=none"])
    assert spec.model.rope_scaling == model.rope_scaling


def test_rope_section_of_the_same_type_is_filled_key_by_key():
    model = model_of(family="llama3", size="1b", rope_scaling={"factor": 4})
    assert (model.rope_scaling.type, model.rope_scaling.factor, model.rope_scaling.original_max_positions) == (
        "llama3", 4.0, 8192)


def test_size_is_case_insensitive():
    assert model_of(family="qwen3", size="1.7B").dim == 2048


def test_unknown_size_lists_the_allowed_ones():
    with pytest.raises(SpecError, match=r"model.size: '2b' is not a size of model.family=qwen3; allowed: 0.6b, 1.7b, "
                       r"4b, 8b, 14b, 32b") as e:
        parse_spec({"model": {"family": "qwen3", "size": "2b"}})
    assert len(e.value.problems) == 1


@pytest.mark.parametrize(("size", "expected"), [
    (7, r"model.size: '7' is not a size of model.family=llama2; allowed: 7b, 13b"),
    ({"b": 7}, r"model.size: got \{'b': 7\}, expected a string"),
])
def test_a_size_of_another_type_is_one_problem(size, expected):
    with pytest.raises(SpecError, match=expected) as e:
        parse_spec({"model": {"family": "llama2", "size": size}})
    assert len(e.value.problems) == 1


def test_size_without_family_is_one_problem():
    with pytest.raises(SpecError, match=r"model.size: '7b' names a published size, but model.family is custom") as e:
        parse_spec({"model": {"size": "7b"}})
    assert len(e.value.problems) == 1


def test_unknown_family_is_the_fields_own_problem():
    with pytest.raises(SpecError, match=r"model.family: got 'qwen4', allowed: 'custom', 'llama2'"):
        parse_spec({"model": {"family": "qwen4", "size": "8b"}})


def test_every_family_has_sizes_and_only_model_fields():
    fields = {f.name: f for f in dataclasses.fields(type(model_of()))}
    assert set(SIZES) == set(FAMILIES) == set(fields["family"].metadata["choices"]) - {"custom"}
    for family, sizes in SIZES.items():
        assert set(FAMILIES[family]) <= set(fields)
        for values in sizes.values():
            assert set(values) <= set(fields)


def test_validate_prints_the_filled_values(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text("model: {family: mistral, size: 7b}\n")
    assert main(["validate", str(path)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)["model"]
    assert (printed["sliding_window"], printed["n_kv_heads"], printed["head_dim"]) == (4096, 8, 128)


def test_bad_size_on_the_cli_exits_2(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text("model: {family: olmo2, size: 70b}\n")
    assert main(["validate", str(path)]) == 2
    assert "model.size: '70b' is not a size of model.family=olmo2; allowed: 1b, 7b, 13b" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- switch rules


def problems(model, **sections):
    with pytest.raises(SpecError) as e:
        parse_spec({"model": model, **sections})
    return [str(p) for p in e.value.problems]


def test_odd_head_dim_is_refused():
    assert problems({"head_dim": 33}) == ["model.head_dim: 33 must be even for RoPE"]


def test_head_dim_frees_dim_from_n_heads():
    assert model_of(dim=100, n_heads=8, head_dim=32).head_dim == 32


def test_heads_split_over_tp_with_their_own_width():
    found = problems({"dim": 2304, "n_heads": 8, "n_kv_heads": 4, "head_dim": 256},
                     parallel={"tp": 8}, resources={"gpus_per_node": 8})
    assert "model.n_kv_heads: 4 key/value heads are not divisible by parallel.tp=8" in found


def test_full_attention_every_needs_a_window():
    assert problems({"full_attention_every": 2}) == [
        "model.full_attention_every: 2 picks the layers that attend fully instead of through a sliding window, but "
        "model.sliding_window is 0 (every layer attends fully); set model.sliding_window or full_attention_every=0"]


def test_full_attention_on_every_layer_leaves_the_window_unused():
    assert problems({"sliding_window": 64, "full_attention_every": 1})[0].startswith(
        "model.full_attention_every: 1 makes every layer attend fully, so model.sliding_window=64 is never used")


@pytest.mark.parametrize(("rope", "expected"), [
    ({"factor": 8}, "model.rope_scaling.factor: 8.0 with model.rope_scaling.type=none stretches nothing"),
    ({"type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 4},
     "model.rope_scaling.high_freq_factor: 4.0 with low_freq_factor=4.0: llama3 scaling needs 0 < low_freq_factor "
     "< high_freq_factor"),
    ({"type": "yarn", "factor": 4, "beta_fast": 1, "beta_slow": 32},
     "model.rope_scaling.beta_fast: 1.0 is below beta_slow=32.0"),
])
def test_rope_scaling_parameters_match_the_type(rope, expected):
    found = problems({"rope_scaling": rope})
    assert len(found) == 1 and found[0].startswith(expected)


def test_sequences_longer_than_the_context_are_refused():
    assert problems({"family": "llama2", "size": "7b"}, data={"seq_len": 8192}) == [
        "data.seq_len: 8192 is longer than model.max_positions=4096, the context the model is meant for; shorten "
        "data.seq_len or raise model.max_positions (0: data.seq_len)"]


def test_a_presets_vocabulary_smaller_than_the_tokenizer_says_how_to_size_it_from_the_shards(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"seq_len": 4096, "tokenizer": {"vocab_size": 50257}}))
    raw = {"model": {"family": "mistral", "size": "7b"}, "data": {"path": str(tmp_path)}}
    assert problems(raw["model"], data=raw["data"]) == [
        "model.vocab_size: 32000 is smaller than the tokenizer's 50257 tokens; model.family=mistral brings its own "
        "vocabulary: set model.vocab_size to null to size it from the shards' tokenizer instead"]
    raw["model"]["vocab_size"] = None
    assert parse_spec(raw).model.vocab_size == 51200  # the tokenizer's, padded to 1024


def test_a_checkpoint_of_a_preset_resumes_under_the_same_values_written_out(tmp_path):
    from parallel.restore import check_same_model

    saved = parse_spec({"model": {"family": "qwen3", "size": "0.6b"}})
    path = tmp_path / "spec.yaml"
    path.write_text(spec_to_yaml(saved))
    written_out = {k: v for k, v in spec_to_dict(saved)["model"].items() if k not in ("family", "size")}
    check_same_model(str(path), parse_spec({"model": written_out}))
    with pytest.raises(CheckpointError, match=r"model.n_layers: 28 in the checkpoint, 14 now"):
        check_same_model(str(path), parse_spec({"model": {"family": "qwen3", "size": "0.6b", "n_layers": 14}}))
