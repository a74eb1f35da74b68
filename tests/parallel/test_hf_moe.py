"""Mixtures of experts through Hugging Face's format, against transformers' own Qwen3-MoE and Mixtral classes (random
small configs built in code, fp32, eager attention): logits both ways, the per-expert tensors `save_pretrained`
writes, the spec `pretrain import` writes, a run of an imported model exported and generated from, and what is
refused. The helpers are the dense families' (tests/parallel/test_hf_families.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from tokenizers import Tokenizer

from orchestrator.cli import main as pretrain
from orchestrator.errors import UserError
from orchestrator.validate import load_spec
from parallel.hf import HFExport, load_hf_model, model_settings, open_hf_weights, open_init_weights, save_hf
from parallel.hf_families import family_name
from parallel.model import ModelDims
from tests.parallel.test_hf_families import _COMMON, ATOL, PROMPT, TINY, assert_refused, random_hf, tokens
from tests.shards import write_shards

# name → (config class, its settings, the spec's model.family, the model.moe values import must write)
CASES = {
    # layer 0 dense (mlp_only_layers) at intermediate_size, layers 1-2 experts of moe_intermediate_size
    "qwen3_moe": (tf.Qwen3MoeConfig, dict(head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                          norm_topk_prob=True, mlp_only_layers=[0], router_aux_loss_coef=0.01),
                  "qwen3", dict(num_experts=4, top_k=2, first_dense_layers=1, every_n_layers=1, expert_ffn_dim=48,
                                norm_topk=True, aux_loss_coef=0.01)),
    # every other layer sparse, the top-k weights as the softmax gives them
    "qwen3_moe-step2": (tf.Qwen3MoeConfig, dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=32,
                                                decoder_sparse_step=2, norm_topk_prob=False),
                        "qwen3", dict(num_experts=6, top_k=3, first_dense_layers=0, every_n_layers=2,
                                      expert_ffn_dim=32, norm_topk=False, aux_loss_coef=0.001)),
    "mixtral": (tf.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=5),
                "mistral", dict(num_experts=4, top_k=2, first_dense_layers=0, every_n_layers=1, expert_ffn_dim=96,
                                norm_topk=True, aux_loss_coef=0.001)),
}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/parallel/conftest.py


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name → (transformers model, its directory), each built once."""
    built: dict[str, tuple[tf.PreTrainedModel, Path]] = {}

    def get(name: str) -> tuple[tf.PreTrainedModel, Path]:
        if name not in built:
            cls, settings, _, _ = CASES[name]
            directory = tmp_path_factory.mktemp(name)
            built[name] = random_hf(directory, cls(**{**_COMMON, **settings})), directory
        return built[name]

    return get


@pytest.mark.parametrize("name", CASES)
def test_logits_match_transformers_both_ways(name: str, saved, tmp_path: Path) -> None:
    reference, directory = saved(name)
    ours = load_hf_model(str(directory))
    assert [ours.dims.is_moe(i) for i in range(3)] == [
        type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in reference.model.layers]
    x = tokens()
    with torch.no_grad():
        expected = reference(x).logits
        assert expected.std() > 0.3
        torch.testing.assert_close(ours(x), expected, rtol=0, atol=ATOL)
    family = family_name(json.loads((directory / "config.json").read_text()))
    save_hf(str(tmp_path), ours.state_dict(), ours.dims, HFExport(family=family, max_positions=256))
    with safe_open(tmp_path / "model.safetensors", "pt") as written, \
            safe_open(directory / "model.safetensors", "pt") as original:
        assert sorted(written.keys()) == sorted(original.keys())  # per expert, as save_pretrained writes them
    exported = tf.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(exported) is type(reference)
    with torch.no_grad():
        torch.testing.assert_close(exported(x).logits, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", CASES)
def test_import_writes_the_experts_and_init_from_accepts_them(name: str, saved, tmp_path: Path, capsys) -> None:
    _, directory = saved(name)
    out = tmp_path / "job.yaml"
    assert pretrain(["import", str(directory), str(TINY), f"data.path={tmp_path / 'shards'}", "data.seq_len=64",
                     "parallel.backend=native", "-o", str(out)]) == 0
    family, moe = CASES[name][2], CASES[name][3]
    assert f"pretrain import: {family}, " in capsys.readouterr().err
    spec = load_spec(out)
    assert spec.model.family == family
    assert {k: getattr(spec.model.moe, k) for k in moe} == moe
    assert (spec.model.moe.balance, spec.model.moe.score, spec.model.moe.num_shared_experts) == ("aux_loss",
                                                                                                 "softmax", 0)
    resolved = ModelDims.from_config(spec.model)
    weights = open_hf_weights(str(directory))
    assert model_settings(resolved) == model_settings(weights.dims)
    assert len(open_init_weights(spec.checkpoint.init_from, resolved)) == len(weights)
    # the run's spec with other experts is named field by field
    other = load_spec(out, [f"model.moe.top_k={moe['top_k'] - 1}"])
    with pytest.raises(UserError, match=rf"model.moe.top_k: {moe['top_k'] - 1} in the job spec, {moe['top_k']} in "
                                        "config.json"):
        open_init_weights(spec.checkpoint.init_from, ModelDims.from_config(other.model))


def test_an_imported_moe_trains_exports_and_generates(saved, tmp_path: Path, monkeypatch, capsys) -> None:
    """Qwen3-MoE imported, one step trained (auxiliary loss on), exported: transformers loads it with the trained
    weights, and `pretrain generate` of the export (KV cache, routing each new token) writes transformers' greedy
    continuation."""
    original, directory = saved("qwen3_moe")
    shards = write_shards(tmp_path / "shards", seq_len=32, rows=40)
    spec_file, ckpt = tmp_path / "job.yaml", tmp_path / "ckpt"
    assert pretrain(["import", str(directory), str(TINY), f"data.path={shards}", "data.seq_len=32",
                     f"checkpoint.dir={ckpt}", "schedule.steps=1", "schedule.warmup_steps=0", "schedule.eval_every=0",
                     "parallel.micro_batch_size=2", "parallel.precision=fp32", "parallel.backend=native",
                     "resources.gpus_per_node=1", "checkpoint.async_save=false", "metrics.enabled=false",
                     "-o", str(spec_file)]) == 0
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT="0").items():
        monkeypatch.setenv(key, value)
    assert pretrain(["train", str(spec_file)]) == 0
    monkeypatch.chdir(tmp_path)
    assert pretrain(["export", "ckpt", "out"]) == 0
    exported = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    trained = exported.state_dict()
    changed = [n for n, p in original.state_dict().items() if not torch.equal(p, trained[n])]
    assert any(".experts." in n for n in changed) and any(".mlp.gate." in n for n in changed)

    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    prompt = tokenizer.encode(PROMPT).ids
    with torch.no_grad():
        expected = exported.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):]
    capsys.readouterr()
    assert pretrain(["generate", "out", "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "24",
                     "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"[1] {PROMPT}{tokenizer.decode(expected.tolist())}"


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("name,changes,message", [
    ("qwen3_moe", {"model_type": "qwen2_moe"},
     r"model_type='qwen2_moe': not supported: shared_expert_gate: Qwen2-MoE scales its shared expert by a learned "
     r"sigmoid gate"),
    ("qwen3_moe", {"mlp_only_layers": [1]},
     r"cannot load as a qwen3_moe model: mlp_only_layers=\[1\]: with decoder_sparse_step=1, only the first layers "
     r"dense is supported"),
    ("qwen3_moe", {"num_experts_per_tok": 5, "norm_topk_prob": "yes"},
     r"norm_topk_prob='yes': expected true or false"),
    ("mixtral", {"router_jitter_noise": 0.1},
     r"cannot load as a mixtral model: router_jitter_noise=0.1: routing noise is not supported \(only 0\)"),
    ("mixtral", {"num_experts_per_tok": 5}, r"num_experts_per_tok=5: more than the 4 experts"),
], ids=["qwen2-moe", "dense-layer-pattern", "wrong-type", "jitter", "top-k"])
def test_what_the_model_cannot_represent_is_named(name: str, changes: dict, message: str, saved,
                                                  tmp_path: Path) -> None:
    assert_refused(saved(name)[1], tmp_path, changes, r"config.json: .*" + message)


def test_expert_tensors_out_of_place_or_missing_are_named(saved, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    directory = Path(shutil.copytree(saved("mixtral")[1], tmp_path / "model"))
    weights = load_file(directory / "model.safetensors")
    extra = dict(weights, **{"model.layers.1.block_sparse_moe.experts.4.w1.weight": torch.zeros(96, 64)})
    save_file(extra, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"tensor model.layers.1.block_sparse_moe.experts.4.w1.weight \[96, 64\] has "
                                       r"no place in the mixtral model"):
        open_hf_weights(str(directory))
    del weights["model.layers.2.block_sparse_moe.experts.3.w2.weight"]
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"tensor model.layers.2.block_sparse_moe.experts.3.w2.weight missing"):
        open_hf_weights(str(directory))


def test_a_learned_routing_bias_is_refused_before_writing(saved, tmp_path: Path) -> None:
    ours = load_hf_model(str(saved("qwen3_moe")[1]))
    state = ours.state_dict()
    biases = [n for n in state if n.endswith("mlp.expert_bias")]
    assert biases  # the buffer travels with the state (a checkpoint holds it)
    save_hf(str(tmp_path / "zero"), state, ours.dims, HFExport(family="qwen3"))  # never moved: exports
    state[biases[0]][0] += 0.5  # expert 0 of the first MoE layer chosen more often
    with pytest.raises(UserError, match=rf"tensor {biases[0]}: the model routes with a learned expert bias "
                                       r"\(model.moe.balance=aux_free or both\), which Qwen3MoeForCausalLM has no "
                                       "place for"):
        save_hf(str(tmp_path / "out"), state, ours.dims, HFExport(family="qwen3"))
    assert not (tmp_path / "out").exists()
