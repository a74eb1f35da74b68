"""Hugging Face import and export of every family under tensor or pipeline parallelism, through the real commands.

A random small model of each family, built with transformers' own class (Llama 3.1 with its llama3 RoPE scaling,
Qwen2 with biases and tied embeddings, Qwen3 with per-head query/key norms and head_dim ≠ dim / n_heads, Mistral with a
sliding window shorter than the sequence, OLMo 2 with post-norms and norms over all heads, Gemma 2 with sandwich
norms, soft-caps, scaled and tied embeddings and alternating windows), is imported (`pretrain import`) into a tp2
or a pp2 run that trains one step on real shards (`pretrain train` under torchrun, fp32) and checkpoints.
transformers is the reference each way: its loss on the run's first batch must be the run's first loss (the imported
weights, before the update); after `pretrain export` gathers the checkpoint, its loss on the validation batch must be
the run's validation loss (the trained weights, gathered); and its greedy generation from the exported model must be
what `pretrain generate` writes from the checkpoint itself, 32 tokens.

Each family runs one layout, chosen so that each engine runs both layouts and sequence parallelism runs on both
engines. What import, export and generation add to training is the conversion of whole state dicts (per family) and
the reading of a layout's checkpoint (DeepSpeed's in its layout, the native engine's resharded into one process);
every family's switches under every layout of both engines are held to one process by test_family_layouts.

Weights are drawn with std 0.2 (transformers' initializer_range) so the logits are peaked: a greedy choice between
near-equal logits would flip on rounding alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from orchestrator.cli import main as pretrain
from orchestrator.validate import load_spec
from parallel.callbacks import read_history
from parallel.hf import open_init_weights
from parallel.loader import build_loaders
from parallel.model import build_model, cross_entropy
from tests.helpers import torchrun
from tests.shards import EOS, write_shards

REPO = Path(__file__).resolve().parents[2]
ATOL = 1e-4
RUN = ["data.seq_len=32", "parallel.micro_batch_size=2", "parallel.grad_accum=2", "parallel.precision=fp32",
       "schedule.steps=1", "schedule.warmup_steps=0", "schedule.eval_every=1", "schedule.eval_batches=1",
       "optim.lr=1e-2", "checkpoint.async_save=false", "metrics.enabled=false"]

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("hf-layouts")]


def byte_tokenizer(path: Path) -> Path:
    """A real tokenizer.json for the byte shards: id b is byte b, 256 ends a document."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    by_byte = sorted(alphabet, key=lambda c: _byte_of(c))
    vocab = {c: i for i, c in enumerate(by_byte)} | {"<|endoftext|>": EOS}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.save(str(path))
    return path


def _byte_of(char: str) -> int:
    """GPT-2's byte → printable character table, inverted (printable bytes map to themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}
    return table[char]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    directory = write_shards(tmp_path_factory.mktemp("hf-shards") / "shards", seq_len=32, rows=120)
    byte_tokenizer(directory / "tokenizer.json")
    return directory


NATIVE, DEEPSPEED = "parallel.backend=native", "parallel.backend=deepspeed"
SP = "parallel.sequence_parallel=true"
# family → (transformers config class, its settings, its layout, the engine and its switches)
FAMILIES = {
    "llama3": (tf.LlamaConfig, dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}), "tp2", [NATIVE, SP]),
    "qwen2": (tf.Qwen2Config, dict(tie_word_embeddings=True), "pp2", [DEEPSPEED]),
    "qwen3": (tf.Qwen3Config, dict(head_dim=32), "pp2", [NATIVE]),
    "mistral": (tf.MistralConfig, dict(sliding_window=8), "tp2", [DEEPSPEED, SP]),
    "olmo2": (tf.Olmo2Config, {}, "tp2", [NATIVE]),
    "gemma2": (tf.Gemma2Config, dict(head_dim=32, query_pre_attn_scalar=24, sliding_window=8, tie_word_embeddings=True,
                                     attn_logit_softcapping=20.0, final_logit_softcapping=10.0), "pp2", [DEEPSPEED]),
}
LAYOUTS = {"tp2": "parallel.tp=2", "pp2": "parallel.pp=2"}
PROMPT = "In the beginning"


def hf_model(hf_dir: Path, family: str) -> tf.PreTrainedModel:
    cls, settings, _, _ = FAMILIES[family]
    config = cls(**{"vocab_size": 260, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
                    "max_position_embeddings": 64, "tie_word_embeddings": False, "initializer_range": 0.2,
                    "eos_token_id": EOS, "bos_token_id": None, "pad_token_id": None, **settings})
    config._attn_implementation = "eager"  # Gemma 2's soft-capped scores exist only there
    torch.manual_seed(7)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(hf_dir)
    return model


def hf_loss(model: tf.PreTrainedModel, micro_batches) -> float:
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(model(mb.inputs).logits.flatten(0, 1), mb.targets.flatten())
                  for mb in micro_batches]
    return float(torch.stack(losses).mean())


def pretrain_train(procs: int, spec: Path, tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "TMPDIR": str(tmp),
           "PYTHONPATH": str(REPO)}
    cmd = [*torchrun(procs), "-m", "orchestrator.cli", "train", str(spec)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp)


@pytest.mark.parametrize("family", FAMILIES, ids=[f"{f}-{FAMILIES[f][2]}" for f in FAMILIES])
def test_import_train_export_generate_match_transformers(family: str, shards: Path, tmp_path: Path, capsys) -> None:
    reference = hf_model(tmp_path / "hf", family)
    spec_file, ckpt = tmp_path / "job.yaml", tmp_path / "ckpt"
    _, _, layout, engine = FAMILIES[family]
    assert pretrain(["import", str(tmp_path / "hf"), str(REPO / "examples" / "tiny.yaml"), *RUN, LAYOUTS[layout],
                     *engine, f"data.path={shards}", f"checkpoint.dir={ckpt}", "-o", str(spec_file)]) == 0
    spec = load_spec(spec_file)
    tied = reference.config.tie_word_embeddings
    assert (spec.model.family, spec.model.vocab_size, spec.model.tie_embeddings) == (family, 260, tied)
    assert spec.checkpoint.init_from == str(tmp_path / "hf")

    done = pretrain_train(2, spec_file, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    history = read_history(str(ckpt / "history.jsonl"))
    train_loader, val_loader = build_loaders(spec, dp_rank=0, dp_size=1)
    first_batch, val_batch = train_loader.next_step(), val_loader.next_step()
    train_loader.close()
    val_loader.close()
    # import: the run's first loss is computed with the imported weights, before the optimizer step
    assert history["step"][0]["loss"] == pytest.approx(hf_loss(reference, first_batch), abs=ATOL)

    capsys.readouterr()
    assert pretrain(["export", str(ckpt), str(tmp_path / "out"), "--max-shard-size", "100KB"]) == 0
    assert "step 1, dp=1 pp=" in capsys.readouterr().out
    files = sorted(os.listdir(tmp_path / "out"))
    assert "model.safetensors.index.json" in files and "tokenizer.json" in files
    exported = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(exported) is type(reference) and exported.config.tie_word_embeddings is tied
    # export: transformers on the gathered weights gives the run's own validation loss after the step
    after = hf_loss(exported, val_batch)
    assert history["eval"][0]["loss"] == pytest.approx(after, abs=ATOL)
    assert abs(after - hf_loss(reference, val_batch)) > 10 * ATOL  # the step did change the weights
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == EOS

    # generation from the checkpoint (gathered from its layout) is transformers' greedy decoding of the export
    tokenizer = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    prompt = torch.tensor([tokenizer.encode(PROMPT).ids])
    with torch.no_grad():
        expected = exported.generate(prompt, max_new_tokens=32, do_sample=False)[0, prompt.shape[1]:].tolist()
    assert len(expected) == 32 and EOS not in expected, "a case stopping early compares fewer tokens: reseed it"
    capsys.readouterr()
    assert pretrain(["generate", str(ckpt), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "32",
                     "--device", "cpu"]) == 0
    written = capsys.readouterr().out.rsplit("\npretrain generate: ", 1)[0]
    assert written == f"[1] {PROMPT}{tokenizer.decode(expected, skip_special_tokens=False)}"


def test_a_context_extension_trains_from_the_import_under_its_own_rope(tmp_path: Path, capsys) -> None:
    """The long-context workflow on an imported model (max_position_embeddings 64): `pretrain import` keeps the
    overrides' context (128) and ten times larger rope_theta, and the run trains at that length with per-document
    masks and positions under cp2. Its first loss is that of the model's weights under the new RoPE, in one process
    with the same documents: the run read the weights, took the spec's RoPE, and cut the documents' masks into the
    cp chunks."""
    hf_model(tmp_path / "hf", "llama3")
    shards = write_shards(tmp_path / "shards", seq_len=128, rows=40, sources=("fortunes",))
    byte_tokenizer(shards / "tokenizer.json")
    spec_file, ckpt = tmp_path / "job.yaml", tmp_path / "ckpt"
    extension = ["data.seq_len=128", "model.max_positions=128", "model.rope_theta=5000000.0", "parallel.cp=2",
                 "model.attention_mask=document", "model.rope_positions=document"]
    assert pretrain(["import", str(tmp_path / "hf"), str(REPO / "examples" / "tiny.yaml"), *RUN, *extension, NATIVE,
                     f"data.path={shards}", f"checkpoint.dir={ckpt}", "-o", str(spec_file)]) == 0
    done = pretrain_train(2, spec_file, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert "RoPE as the job spec sets it (model.rope_theta: 500000.0 → 5000000.0)" in done.stdout
    spec = load_spec(spec_file)
    assert (spec.model.max_positions, spec.model.rope_theta, spec.model.rope_scaling.type) == (128, 5e6, "llama3")
    model = build_model(spec.model, "cpu").eval()
    weights = open_init_weights(str(tmp_path / "hf"), model.dims)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(weights[name])
    train_loader, val_loader = build_loaders(spec, dp_rank=0, dp_size=1)
    batch = train_loader.next_step()
    train_loader.close()
    val_loader.close()
    assert any(len(mb.documents.unique()) > 1 for mb in batch), "the rows hold several documents"
    with torch.no_grad():
        expected = torch.stack([cross_entropy(model(mb.inputs, documents=mb.documents), mb.targets) for mb in batch])
    first = read_history(str(ckpt / "history.jsonl"))["step"][0]["loss"]
    assert first == pytest.approx(float(expected.mean()), abs=ATOL)
    original = build_model(dataclasses.replace(spec.model, rope_theta=500000.0), "cpu").eval()
    original.load_state_dict(model.state_dict())
    with torch.no_grad():
        before = torch.stack([cross_entropy(original(mb.inputs, documents=mb.documents), mb.targets) for mb in batch])
    assert abs(float(before.mean()) - first) > 10 * ATOL, "the spec's RoPE, not the model's, ran"
