"""Hugging Face files in one process, against transformers' own LlamaForCausalLM (random small configs, built in
code): logits agree both ways in fp32 (sharded files and indexes too), and every damaged directory, wrong shape or
mismatched run is one clear UserError. Each family's mapping is tests/parallel/test_hf_families.py's."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from orchestrator.cli import main as pretrain
from orchestrator.errors import CheckpointError, UserError
from parallel.consolidate import find_checkpoint
from parallel.hf import HFExport, load_hf_model, open_hf_weights, open_init_weights, rope_changes, save_hf
from parallel.model import ModelDims, build_model
from parallel.rope import RopeScaling

ATOL = 1e-4
TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny.yaml"

CONFIGS = {
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0),
    "mha-tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "mqa-3-layers": dict(num_attention_heads=8, num_key_value_heads=1, num_hidden_layers=3, rms_norm_eps=1e-6),
}


def hf_config(**changes) -> LlamaConfig:
    base = dict(vocab_size=211, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=128, tie_word_embeddings=False)
    return LlamaConfig(**{**base, **changes})


def random_hf(directory: Path, seed: int = 0, max_shard_size: str | None = None, **changes) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_config(**changes)).eval()
    with torch.no_grad():  # norms away from one, so a misplaced norm weight shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(directory, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return model


def tokens(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("changes", CONFIGS.values(), ids=CONFIGS.keys())
def test_imported_model_gives_transformers_logits(changes: dict, tmp_path: Path) -> None:
    reference = random_hf(tmp_path, **changes)
    ours = load_hf_model(str(tmp_path))
    x = tokens(211)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x).logits, rtol=0, atol=ATOL)


def test_sharded_checkpoint_with_an_index_is_read(tmp_path: Path) -> None:
    reference = random_hf(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    x = tokens(211)
    with torch.no_grad():
        torch.testing.assert_close(load_hf_model(str(tmp_path))(x), reference(x).logits, rtol=0, atol=ATOL)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_exported_model_gives_our_logits_in_transformers(tie: bool, tmp_path: Path) -> None:
    dims = ModelDims(vocab_size=300, dim=96, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=256, norm_eps=1e-5,
                     rope_theta=40000.0, tie_embeddings=tie, init_std=0.05)
    ours = build_model(dims, "cpu").eval()
    ours.init_weights(seed=3)
    files = save_hf(str(tmp_path), ours.state_dict(), dims, HFExport(max_shard_bytes=60_000, max_positions=64))
    assert len([f for f in files if f.endswith(".safetensors")]) > 1 and "model.safetensors.index.json" in files
    exported = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert exported.config.tie_word_embeddings is tie
    x = tokens(300)
    with torch.no_grad():
        torch.testing.assert_close(exported(x).logits, ours(x), rtol=0, atol=ATOL)


def test_bf16_export_halves_the_weights_and_stays_close(tmp_path: Path) -> None:
    dims = ModelDims(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=128, norm_eps=1e-5,
                     rope_theta=10000.0, tie_embeddings=False, init_std=0.02)
    ours = build_model(dims, "cpu").eval()
    ours.init_weights(seed=0)
    save_hf(str(tmp_path), ours.state_dict(), dims, HFExport(dtype=torch.bfloat16))
    stored = load_file(tmp_path / "model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"


# ---------------------------------------------------------------------------------------------- bad inputs


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    config = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("hf-good")
    random_hf(directory)
    return directory


@pytest.fixture
def hf_dir(good_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(good_dir, tmp_path / "model"))


def test_missing_directory_and_config(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nowhere: no such directory \(expected a Hugging Face model directory"):
        open_hf_weights(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"config.json: missing; a Hugging Face model directory holds"):
        open_hf_weights(str(tmp_path))


def test_a_tensor_of_the_wrong_shape_is_named(hf_dir: Path) -> None:
    edit_config(hf_dir, intermediate_size=192)
    with pytest.raises(UserError, match=r"model.safetensors: tensor model.layers.0.mlp.down_proj.weight has "
                                       r"shape \[64, 176\], the config \(config.json\) needs \[64, 192\]"):
        open_hf_weights(str(hf_dir))


def test_missing_and_unexpected_tensors_are_named(hf_dir: Path) -> None:
    weights = load_file(hf_dir / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"tensor model.norm.weight missing from the weights"):
        open_hf_weights(str(hf_dir))
    weights["model.layers.1.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(weights, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"tensor model.layers.1.self_attn.q_proj.bias \[64\] has no place"):
        open_hf_weights(str(hf_dir))


def test_weights_only_in_pytorch_format_are_refused(hf_dir: Path) -> None:
    (hf_dir / "model.safetensors").rename(hf_dir / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"no model.safetensors or model.safetensors.index.json "
                                       r"\(pytorch_model.bin found: convert them to safetensors first\)"):
        open_hf_weights(str(hf_dir))


def test_init_from_a_model_of_another_shape_names_each_field(hf_dir: Path) -> None:
    """RoPE's settings may differ (a context extension); the shape may not."""
    run = ModelDims(vocab_size=211, dim=128, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=176, norm_eps=1e-5,
                    rope_theta=500000.0, tie_embeddings=False, init_std=0.02)
    with pytest.raises(UserError, match=r"checkpoint.init_from: .*model: the model differs from the run's: "
                                       r"model.dim: 128 in the job spec, 64 in config.json; "
                                       r"model.n_kv_heads: 4 in the job spec, 2 in config.json") as refused:
        open_init_weights(str(hf_dir), run)
    assert "rope" not in str(refused.value)


def test_init_from_takes_the_weights_under_the_run_s_rope(good_dir: Path) -> None:
    """A context extension: the run starts from the model's weights with its own rope_theta and llama3 scaling, and
    computes what transformers computes with those weights under that RoPE (not the config's)."""
    config = load_hf_model(str(good_dir)).dims
    scaling = RopeScaling("llama3", factor=8.0, original_max_positions=64, low_freq_factor=1.0, high_freq_factor=4.0)
    run = dataclasses.replace(config, rope_theta=500000.0, rope_scaling=scaling)
    weights = open_init_weights(str(good_dir), run)
    assert rope_changes(weights.dims, run) == [
        "model.rope_theta: 10000.0 → 500000.0", "model.rope_scaling.type: 'none' → 'llama3'",
        "model.rope_scaling.factor: 1.0 → 8.0", "model.rope_scaling.original_max_positions: 8192 → 64"]
    assert rope_changes(weights.dims, config) == []
    ours = build_model(run, "cpu").eval()
    with torch.no_grad():
        for name, param in ours.named_parameters():
            param.copy_(weights[name])
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    config_json = json.loads((good_dir / "config.json").read_text())
    extended_config = LlamaConfig(**{**config_json, "rope_theta": 500000.0, "rope_scaling": rope})
    extended = LlamaForCausalLM.from_pretrained(good_dir, config=extended_config).eval()
    original = LlamaForCausalLM.from_pretrained(good_dir).eval()
    x = tokens(211)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), extended(x).logits, rtol=0, atol=ATOL)
        assert (ours(x) - original(x).logits).abs().max() > 10 * ATOL, "the RoPE change reached the logits"


def test_init_from_a_pretrain_checkpoint_says_to_export_it(tmp_path: Path) -> None:
    (tmp_path / "step_4").mkdir()
    (tmp_path / "latest").write_text("step_4\n")
    dims = ModelDims(211, 64, 2, 4, 2, 176, 1e-5, 10000.0, False, 0.02)
    with pytest.raises(UserError, match=r"is a pretrain checkpoint; export it with `pretrain export"):
        open_init_weights(str(tmp_path), dims)


def test_checkpoint_lookup_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"gone: no such checkpoint directory"):
        find_checkpoint(str(tmp_path / "gone"))
    (tmp_path / "step_3").mkdir()
    with pytest.raises(CheckpointError, match=r"holds no complete checkpoint \(a step_<N> directory with manifest"):
        find_checkpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"step_3: incomplete checkpoint, it has no manifest.json"):
        find_checkpoint(str(tmp_path / "step_3"))
    (tmp_path / "step_3" / "manifest.json").write_text("{}")
    (tmp_path / "step_5").mkdir()  # newer, but unfinished
    assert find_checkpoint(str(tmp_path)) == str(tmp_path / "step_3")


def test_import_refuses_overrides_of_what_the_model_fixes(good_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "job.yaml"
    assert pretrain(["import", str(good_dir), str(TINY), "model.dim=128", "model.n_layers=4", "model.rope_theta=5e5",
                     "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pretrain import: model.dim, model.n_layers: set by the model in ") and "(64, 2)" in err
    assert "rope_theta" not in err.split(";")[0] and "Traceback" not in err and not out.exists()


def test_cli_reports_bad_inputs_in_one_line(hf_dir: Path, tmp_path: Path, capsys) -> None:
    edit_config(hf_dir, attention_bias=True)
    assert pretrain(["import", str(hf_dir), str(TINY)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pretrain import: ") and "attention_bias=true: biases on all four attention" in err
    assert "Traceback" not in err
    assert pretrain(["export", str(tmp_path / "none"), str(tmp_path / "out")]) == 2
    assert "pretrain export: " + str(tmp_path / "none") + ": no such checkpoint directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert pretrain(["export", str(tmp_path / "none"), str(tmp_path / "full")]) == 2
    assert "full: already holds files; give a new or empty directory" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert pretrain(["export", str(tmp_path / "none"), str(tmp_path / "o"), "--max-shard-size", "lots"]) == 2
    assert "--max-shard-size: 'lots' is not a size" in capsys.readouterr().err


def test_import_writes_a_spec_with_the_model_and_init_from(good_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "job.yaml"
    argv = ["import", str(good_dir), str(TINY), f"data.path={tmp_path / 'shards'}", "parallel.pp=2"]
    assert pretrain([*argv, "-o", str(out)]) == 0
    from orchestrator.validate import load_spec

    spec = load_spec(out)
    assert (spec.model.dim, spec.model.n_layers, spec.model.n_kv_heads, spec.model.ffn_dim) == (64, 2, 2, 176)
    assert (spec.model.vocab_size, spec.model.norm_eps, spec.parallel.pp) == (211, 1e-5, 2)
    assert spec.checkpoint.init_from == str(good_dir)
    assert "start it with: pretrain submit" in capsys.readouterr().err
    weights = open_init_weights(spec.checkpoint.init_from, load_hf_model(str(good_dir)).dims)
    assert torch.equal(weights["norm.weight"], load_file(good_dir / "model.safetensors")["model.norm.weight"])
