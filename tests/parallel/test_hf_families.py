"""Every family `pretrain import` takes, against transformers' own classes (random small configs built in code, fp32,
eager attention): logits both ways, greedy generation, the spec import writes, what is refused, and a model's
identity (context, special tokens, tokenizer, chat template, generation config) kept through a training run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from orchestrator.cli import main as pretrain
from orchestrator.errors import UserError
from orchestrator.spec import spec_to_yaml
from orchestrator.validate import load_spec
from parallel.generate import SamplingConfig, generate
from parallel.hf import (
    HFExport,
    load_hf_model,
    model_settings,
    open_hf_weights,
    open_init_weights,
    read_hf_config,
    save_hf,
)
from parallel.hf_families import FAMILIES, dims_from_hf_config, family_name, identity_of
from parallel.model import ModelDims, build_model
from tests.shards import write_shards

ATOL = 1e-4
VOCAB = 300
TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny.yaml"
PROMPT = "In the beginning God created"
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
               pad_token_id=None)
# name → (config class, its settings, the spec's model.family import must write)
CASES = {
    "llama3.1-rope": (tf.LlamaConfig, dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}), "llama3"),
    "llama-linear-head-dim": (tf.LlamaConfig, dict(head_dim=32, rope_scaling={"rope_type": "linear", "factor": 4.0}),
                              "llama2"),
    "llama-yarn": (tf.LlamaConfig, dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 64}), "llama2"),
    "qwen2-tied": (tf.Qwen2Config, dict(tie_word_embeddings=True), "qwen2"),
    "qwen3": (tf.Qwen3Config, dict(head_dim=32), "qwen3"),
    "mistral": (tf.MistralConfig, dict(sliding_window=5), "mistral"),
    "olmo2": (tf.Olmo2Config, {}, "olmo2"),
    "gemma2": (tf.Gemma2Config, dict(head_dim=32, query_pre_attn_scalar=24, sliding_window=5,
                                     attn_logit_softcapping=5.0, final_logit_softcapping=3.0), "gemma2"),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/parallel/conftest.py


def char_tokenizer(path: Path) -> Tokenizer:
    """A real tokenizer.json of VOCAB single characters (printable ASCII first), so any id decodes to one."""
    chars = [chr(c) for c in range(32, 127)] + [chr(c) for c in range(0x100, 0x100 + VOCAB - 95)]
    tokenizer = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=" "))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.save(str(path))
    return tokenizer


def random_hf(directory: Path, config: tf.PretrainedConfig, seed: int = 0) -> tf.PreTrainedModel:
    """transformers' model of `config` with weights large enough for peaked logits, norms away from their identity
    (Gemma's stored w of x̂·(1 + w) around 0, the others' around 1), saved with a tokenizer."""
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    gemma = config.model_type == "gemma2"
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(-0.5, 0.5) if gemma else param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.05 if gemma else 0.2)
    model.save_pretrained(directory)
    char_tokenizer(directory / "tokenizer.json")
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name → (transformers model, its directory), each built once."""
    built: dict[str, tuple[tf.PreTrainedModel, Path]] = {}

    def get(name: str) -> tuple[tf.PreTrainedModel, Path]:
        if name not in built:
            cls, settings, _ = CASES[name]
            directory = tmp_path_factory.mktemp(name)
            built[name] = random_hf(directory, cls(**{**_COMMON, **settings})), directory
        return built[name]

    return get


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", CASES)
def test_logits_match_transformers_both_ways(name: str, saved, tmp_path: Path) -> None:
    reference, directory = saved(name)
    ours = load_hf_model(str(directory))
    x = tokens()
    with torch.no_grad():
        expected = reference(x).logits
        assert expected.std() > 0.3  # not flat: a wrong norm or scale shows
        torch.testing.assert_close(ours(x), expected, rtol=0, atol=ATOL)
    config = read_hf_config(str(directory))
    save_hf(str(tmp_path), ours.state_dict(), ours.dims, HFExport(family=family_name(config), max_positions=256))
    written = json.loads((tmp_path / "config.json").read_text())
    assert (written["model_type"], written["architectures"]) == (config["model_type"], config["architectures"])
    exported = tf.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(x).logits, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", CASES)
def test_greedy_generation_is_transformers(name: str, saved, capsys) -> None:
    reference, directory = saved(name)
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    prompt = tokenizer.encode(PROMPT).ids
    with torch.no_grad():
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt):]
    assert len(expected) == 32
    ours = generate(load_hf_model(str(directory)), [prompt], SamplingConfig(max_new_tokens=32, temperature=0))
    assert ours.tokens == [expected.tolist()]
    capsys.readouterr()
    assert pretrain(["generate", str(directory), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "32",
                     "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"[1] {PROMPT}{tokenizer.decode(expected.tolist())}"


@pytest.mark.parametrize("name", CASES)
def test_import_writes_every_model_field_and_init_from_accepts_it(name: str, saved, tmp_path: Path, capsys) -> None:
    _, directory = saved(name)
    out = tmp_path / "job.yaml"
    assert pretrain(["import", str(directory), str(TINY), f"data.path={tmp_path / 'shards'}", "data.seq_len=64",
                     "-o", str(out)]) == 0
    assert f"pretrain import: {CASES[name][2]}, " in capsys.readouterr().err
    spec = load_spec(out)
    weights = open_hf_weights(str(directory))
    assert (spec.model.family, spec.model.size, spec.model.max_positions) == (CASES[name][2], "", 256)
    resolved = ModelDims.from_config(spec.model)
    assert model_settings(resolved) == model_settings(weights.dims)
    assert spec.model.head_dim == weights.dims.head_dim and spec.model.ffn_dim == 96
    assert len(open_init_weights(spec.checkpoint.init_from, resolved)) == len(weights)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_keys_config_json_leaves_out_mean_what_they_mean_to_transformers(model_type: str) -> None:
    sparse = {"model_type": model_type, "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96,
              "num_hidden_layers": 4, "num_attention_heads": 4}
    reference = tf.AutoConfig.for_model(**sparse)
    dims, identity = dims_from_hf_config(sparse, "config.json"), identity_of(sparse)
    assert dims.n_kv_heads == reference.num_key_value_heads
    assert dims.head_dim == (getattr(reference, "head_dim", None) or 16)
    assert (dims.norm_eps, dims.tie_embeddings) == (reference.rms_norm_eps, reference.tie_word_embeddings)
    assert (identity.max_positions, identity.bos_id, identity.eos_id, identity.pad_id) == (
        reference.max_position_embeddings, reference.bos_token_id, reference.eos_token_id, reference.pad_token_id)
    windows = [dims.window(i) for i in range(4)]
    types = getattr(reference, "layer_types", None) or ["sliding_attention"] * 4
    assert windows == [(getattr(reference, "sliding_window", None) or 0) if t == "sliding_attention" else 0
                       for t in types]


@pytest.mark.parametrize("name", ["llama3.1-rope", "llama-yarn", "gemma2"])
def test_both_spellings_of_rope_in_an_export_say_the_same(name: str, saved, tmp_path: Path) -> None:
    ours = load_hf_model(str(saved(name)[1]))
    save_hf(str(tmp_path), ours.state_dict(), ours.dims, HFExport(family=CASES[name][2]))
    written = json.loads((tmp_path / "config.json").read_text())
    v4 = {k: v for k, v in written.items() if k != "rope_parameters"}  # transformers 4 reads these
    v5 = {k: v for k, v in written.items() if k not in ("rope_scaling", "rope_theta")}  # 5 prefers rope_parameters
    assert dims_from_hf_config(v4, "v4") == dims_from_hf_config(v5, "v5") == ours.dims


# ---------------------------------------------------------------------------------------------- refusals


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("name,changes,message", [
    ("olmo2", {"model_type": "gpt2"}, r"model_type='gpt2': not a supported architecture \(one of llama, qwen2, "),
    ("llama-yarn", {"hidden_act": "gelu", "attention_bias": True, "mlp_bias": True},
     r"cannot load as a llama model: attention_bias=true: biases on all four attention projections are not "
     r"supported .*; mlp_bias=true: MLP biases are not supported; hidden_act='gelu': not supported"),
    ("qwen3", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     r"partial_rotary_factor=0.5: RoPE over part of each head is not supported"),
    ("llama-yarn", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     r"rope_parameters.rope_type='dynamic': not supported \(default, linear, llama3 or yarn\)"),
    ("llama-yarn", {"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "truncate": False}},
     r"rope_scaling.truncate=false: YaRN without a truncated correction range is not supported"),
    ("qwen2-tied", {"use_sliding_window": True, "sliding_window": 8},
     r"cannot load as a qwen2 model: use_sliding_window=true: Qwen's sliding-window layers are not supported"),
    ("gemma2", {"layer_types": ["full_attention", "sliding_attention", "sliding_attention"]},
     r"layer_types=\['full_attention', 'sliding_attention', 'sliding_attention'\]: only every n-th layer attending "
     r"fully is supported"),
    ("gemma2", {"layer_types": ["sliding_attention", "full_attention"]},
     r"layer_types=.*: expected num_hidden_layers=3 entries, each 'sliding_attention' or 'full_attention'"),
    ("mistral", {"quantization_config": {"quant_method": "gptq"}},
     r"quantization_config=\{'quant_method': 'gptq'\}: quantized weights are not supported"),
], ids=["model-type", "llama-biases-and-act", "partial-rotary", "dynamic-rope", "yarn-untruncated",
        "qwen-sliding", "gemma-layer-pattern", "gemma-layer-count", "quantized"])
def test_what_the_model_cannot_represent_is_named(name: str, changes: dict, message: str, saved,
                                                  tmp_path: Path) -> None:
    assert_refused(saved(name)[1], tmp_path, changes, r"config.json: (cannot load as a \w+ model: .*)?" + message)


def assert_refused(source: Path, tmp_path: Path, changes: dict, pattern: str) -> None:
    """A copy of the model directory `source` with `changes` made to its config.json is refused as `pattern` says."""
    directory = Path(shutil.copytree(source, tmp_path / "model"))
    edit_config(directory, **changes)
    with pytest.raises(UserError, match=pattern):
        open_hf_weights(str(directory))


def test_a_tensor_with_no_place_is_named(saved, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    directory = Path(shutil.copytree(saved("qwen2-tied")[1], tmp_path / "model"))
    weights = load_file(directory / "model.safetensors")
    weights["model.layers.2.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"tensor model.layers.2.self_attn.o_proj.bias \[64\] has no place in the "
                                       r"qwen2 model config.json describes"):
        open_hf_weights(str(directory))


def test_a_model_no_architecture_expresses_is_refused_before_writing(tmp_path: Path, capsys) -> None:
    dims = ModelDims(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, norm_eps=1e-6,
                     rope_theta=1e4, tie_embeddings=False, init_std=0.02, qkv_bias=True, qk_norm="head")
    with pytest.raises(UserError, match=r"the model's switches fit no transformers architecture, so it cannot be "
                                       r"exported \(qwen3: qkv_bias=True \(always False in qwen3\); llama: "):
        save_hf(str(tmp_path / "out"), build_model(dims, "cpu").state_dict(), dims, HFExport(family="qwen3"))
    assert not (tmp_path / "out").exists()
    # the CLI refuses such a run's checkpoint before starting any rank to gather it
    step = tmp_path / "ckpt" / "step_1"
    step.mkdir(parents=True)
    (step / "manifest.json").write_text("{}")
    # data.path away from examples/tiny.yaml's runs/demo/shards, which `make demo` fills with a larger vocabulary
    spec = load_spec(TINY, ["model.qkv_bias=true", "model.qk_norm=head", f"model.vocab_size={VOCAB}",
                            f"data.path={tmp_path / 'shards'}"])
    (step / "spec.yaml").write_text(spec_to_yaml(spec))
    assert pretrain(["export", str(step), str(tmp_path / "out")]) == 2
    assert "fit no transformers architecture" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_the_cli_refuses_in_one_line(saved, tmp_path: Path, capsys) -> None:
    directory = Path(shutil.copytree(saved("gemma2")[1], tmp_path / "model"))
    edit_config(directory, use_bidirectional_attention=True)
    assert pretrain(["import", str(directory), str(TINY), "-o", str(tmp_path / "job.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pretrain import: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "use_bidirectional_attention=true: the model is causal only" in err
    assert not (tmp_path / "job.yaml").exists()


# ---------------------------------------------------------------------------------------------- identity

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def identity_dir(directory: Path) -> Path:
    """A Qwen2 model whose config.json, tokenizer files and generation config all say who it is."""
    config = tf.Qwen2Config(**{**_COMMON, "max_position_embeddings": 8192, "bos_token_id": 1, "eos_token_id": 2,
                               "pad_token_id": 0, "num_hidden_layers": 2, "tie_word_embeddings": True})
    random_hf(directory, config, seed=5)
    tf.GenerationConfig(bos_token_id=1, eos_token_id=[2, 3], pad_token_id=0, temperature=0.6, top_p=0.9,
                        do_sample=True).save_pretrained(directory)
    specials = {"bos_token": "!", "eos_token": '"', "pad_token": " "}
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 8192, "chat_template": CHAT_TEMPLATE,
        **specials}))
    (directory / "special_tokens_map.json").write_text(json.dumps(specials))
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return directory


def test_an_imported_model_exports_with_its_own_identity_after_training(tmp_path: Path, monkeypatch,
                                                                         capsys) -> None:
    origin = identity_dir(tmp_path / "hf")
    shards = write_shards(tmp_path / "shards", seq_len=32, rows=40)
    spec_file, ckpt = tmp_path / "job.yaml", tmp_path / "ckpt"
    assert pretrain(["import", str(origin), str(TINY), f"data.path={shards}", "data.seq_len=32",
                     f"checkpoint.dir={ckpt}", "schedule.steps=1", "schedule.warmup_steps=0", "schedule.eval_every=0",
                     "parallel.micro_batch_size=2", "resources.gpus_per_node=1", "checkpoint.async_save=false",
                     "metrics.enabled=false",
                     "-o", str(spec_file)]) == 0
    spec = load_spec(spec_file)
    assert (spec.model.family, spec.model.max_positions, spec.data.seq_len) == ("qwen2", 8192, 32)

    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT="0", DS_ACCELERATOR="cpu").items():
        monkeypatch.setenv(key, value)  # one rank, in this process; restored afterwards
    assert pretrain(["train", str(spec_file)]) == 0
    assert "finished step 1" in capsys.readouterr().out
    kept = sorted(p.name for p in (ckpt / "step_1" / "hf_origin").iterdir())
    assert kept == sorted(["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                           "special_tokens_map.json", "chat_template.jinja"])
    assert "hf_origin/tokenizer.json" in (ckpt / "step_1" / "manifest.json").read_text()

    moved = Path(shutil.move(origin, tmp_path / "moved"))  # the identity travels in the checkpoint, not by path
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them
    assert pretrain(["export", "ckpt", "out"]) == 0
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["max_position_embeddings"]) == ("qwen2", 8192)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "generation_config.json"):
        assert (out / name).read_bytes() == (moved / name).read_bytes(), name
    tokenizer = tf.AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == CHAT_TEMPLATE and tokenizer.eos_token == '"'
    exported = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    assert exported.generation_config.eos_token_id == [2, 3]
    original = tf.AutoModelForCausalLM.from_pretrained(moved).eval()
    changed = [n for n, p in exported.state_dict().items() if not torch.equal(p, original.state_dict()[n])]
    assert changed  # the step trained the weights that were exported


def test_a_resumed_run_whose_hf_dir_is_gone_carries_the_earlier_checkpoints_identity(tmp_path: Path) -> None:
    from parallel.hf_origin import keep_origin

    earlier = tmp_path / "ckpt" / "step_4" / "hf_origin"
    earlier.mkdir(parents=True)
    (earlier / "config.json").write_text('{"model_type": "qwen2", "eos_token_id": 7}')
    (earlier / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (tmp_path / "ckpt" / "step_2").mkdir()  # older, kept nothing
    step = tmp_path / "ckpt" / "step_8.partial"
    written = keep_origin(str(tmp_path / "moved-away"), str(step), str(tmp_path / "ckpt"))
    assert sorted(Path(p).name for p in written) == ["chat_template.jinja", "config.json"]
    assert (step / "hf_origin" / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    assert keep_origin("", str(tmp_path / "ckpt" / "step_9"), str(tmp_path / "ckpt")) == []  # not imported
