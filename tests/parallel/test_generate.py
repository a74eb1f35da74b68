"""Sampling with a KV cache: the same greedy tokens as without it and as transformers' `generate`, left-padded
batches equal to their rows run alone, and each logit processor doing what its name says."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM

from orchestrator.cli import main as pretrain
from orchestrator.errors import UserError
from parallel.generate import (
    SamplingConfig,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    generate,
)
from parallel.hf import load_hf_model

PROMPTS = [[5, 17, 3, 99, 42, 8, 61], [7, 7, 120], [200, 1, 2, 3, 4]]
GREEDY = SamplingConfig(max_new_tokens=24, temperature=0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/parallel/conftest.py


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory) -> tuple[LlamaForCausalLM, Path]:
    """A random transformers Llama (weights scaled up: peaked predictions, no near-ties) and its directory."""
    directory = tmp_path_factory.mktemp("gen-hf")
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=128,
                         initializer_range=0.2, eos_token_id=None, bos_token_id=None)
    torch.manual_seed(11)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    return model, directory


@pytest.fixture(scope="module")
def ours(hf_pair):
    return load_hf_model(str(hf_pair[1]))


def test_cached_and_uncached_greedy_give_the_same_tokens(ours) -> None:
    cached = generate(ours, PROMPTS, GREEDY)
    uncached = generate(ours, PROMPTS, GREEDY, use_cache=False)
    assert cached.tokens == uncached.tokens
    assert [len(t) for t in cached.tokens] == [24, 24, 24] and cached.new_tokens == 72
    assert cached.tokens_per_second > 0 and 0 < cached.prefill_seconds <= cached.seconds


@pytest.mark.parametrize("penalty", [1.0, 1.5], ids=["plain", "repetition-penalty"])
def test_greedy_matches_transformers_generate(ours, hf_pair, penalty: float) -> None:
    reference, _ = hf_pair
    config = SamplingConfig(max_new_tokens=24, temperature=0, repetition_penalty=penalty)
    for prompt in PROMPTS:
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                      repetition_penalty=penalty, pad_token_id=0)[0, len(prompt):].tolist()
        assert generate(ours, [prompt], config).tokens == [expected]


def test_a_left_padded_batch_gives_each_row_what_it_gets_alone(ours) -> None:
    batched = generate(ours, PROMPTS, GREEDY).tokens
    assert batched == [generate(ours, [p], GREEDY).tokens[0] for p in PROMPTS]


def test_sampling_is_seeded_and_the_limits_reduce_to_greedy(ours) -> None:
    def sample(**changes) -> list[list[int]]:
        return generate(ours, PROMPTS, SamplingConfig(max_new_tokens=16, temperature=1.5, **changes)).tokens

    assert sample(seed=1) == sample(seed=1)
    assert sample(seed=1) != sample(seed=2)
    greedy = generate(ours, PROMPTS, SamplingConfig(max_new_tokens=16, temperature=0)).tokens
    assert sample(top_k=1) == greedy
    assert sample(top_p=1e-6) == greedy


def test_a_row_stops_at_any_of_its_eos_ids_while_the_others_go_on(ours) -> None:
    free = generate(ours, PROMPTS, GREEDY).tokens
    eos = (free[0][5], free[1][3])  # a model may list several (Llama 3 instruct's end of turn and of text)
    stopped = generate(ours, PROMPTS, SamplingConfig(max_new_tokens=24, temperature=0, eos_ids=eos))
    for row in range(len(PROMPTS)):
        ends = [i for i, t in enumerate(free[row]) if t in eos]
        cut = ends[0] + 1 if ends else 24
        assert stopped.tokens[row] == free[row][:cut]
    assert len(stopped.tokens[0]) <= 6 and len(stopped.tokens[1]) <= 4
    assert stopped.new_tokens == sum(len(t) for t in stopped.tokens)


def test_top_k_keeps_the_k_largest() -> None:
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert apply_top_k(logits, 2).isinf().tolist() == [[True, False, False, True]]
    assert torch.equal(apply_top_k(logits, 0), logits)


def test_top_p_keeps_the_fewest_tokens_reaching_p() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert apply_top_p(logits, 0.7).isinf().tolist() == [[False, False, True, True]]
    assert apply_top_p(logits, 0.8).isinf().tolist() == [[False, False, True, True]]
    assert apply_top_p(logits, 0.81).isinf().tolist() == [[False, False, False, True]]
    assert apply_top_p(logits, 0.01).isinf().tolist() == [[False, True, True, True]]


def test_repetition_penalty_lowers_only_seen_tokens() -> None:
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 2.0, -2.0]]


def test_bad_settings_are_named_together(ours) -> None:
    bad = SamplingConfig(max_new_tokens=0, temperature=-1, top_k=-2, top_p=1.5, repetition_penalty=0)
    with pytest.raises(UserError, match=r"--max-new-tokens: 0, must be at least 1; --temperature: -1, must be ≥ 0 "
                                       r".*--top-k: -2.*--top-p: 1.5, must be in \(0, 1\]; --repetition-penalty: 0"):
        generate(ours, PROMPTS, bad)
    with pytest.raises(UserError, match=r"a prompt token is outside the model's vocabulary \(0..255\)"):
        generate(ours, [[1, 256]], GREEDY)


def test_pretrain_generate_from_a_hugging_face_directory(ours, hf_pair, tmp_path: Path, capsys) -> None:
    """The command end to end: a real tokenizer, a batch of prompts, tokens/s reported, bad flags refused."""
    _, directory = hf_pair
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for f in directory.iterdir():
        (model_dir / f.name).symlink_to(f)
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text().splitlines()
    tokenizer.train_from_iterator(text, trainers.BpeTrainer(vocab_size=256, special_tokens=["[UNK]"]))
    tokenizer.save(str(model_dir / "tokenizer.json"))
    prompts = ["The controller reserves", "pretrain"]
    argv = ["generate", str(model_dir), "--temperature", "0", "--max-new-tokens", "12"]
    assert pretrain([*argv, "--prompt", prompts[0], "--prompt", prompts[1]]) == 0
    lines = capsys.readouterr().out.splitlines()
    for i, prompt in enumerate(prompts):
        expected = generate(ours, [tokenizer.encode(prompt).ids], SamplingConfig(max_new_tokens=12, temperature=0))
        assert lines[i] == f"[{i + 1}] {prompt}{tokenizer.decode(expected.tokens[0], skip_special_tokens=False)}"
    rate = float(re.search(r"\(([\d,.]+) tokens/s", lines[2]).group(1).replace(",", ""))
    assert "2 prompt(s), 24 new tokens" in lines[2] and math.isfinite(rate) and rate > 0

    assert pretrain([*argv, "--prompt", "x", "--top-p", "0"]) == 2
    assert "--top-p: 0.0, must be in (0, 1]" in capsys.readouterr().err
    assert pretrain([*argv, "--prompt", ""]) == 2
    assert "--prompt #1 is empty" in capsys.readouterr().err
    assert pretrain(["generate", str(tmp_path / "nothing"), "--prompt", "x"]) == 2
    assert "nothing: no such checkpoint directory" in capsys.readouterr().err
