"""Hugging Face import and export under tensor and pipeline parallelism, through the real commands.

A random Llama built in transformers is imported (`pretrain import`) into a tp2 or a pp2 run that trains one step on
real shards (`pretrain train` under torchrun, DeepSpeed over gloo, fp32) and checkpoints; `pretrain export` gathers
that checkpoint back into a Hugging Face directory. transformers is the reference both ways: its loss on the run's
first batch must be the run's first loss (the imported weights, before the update), and the exported model's loss
on the validation batch must be the run's validation loss after the step (the trained weights, gathered).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM

from orchestrator.cli import main as pretrain
from orchestrator.validate import load_spec
from parallel.callbacks import read_history
from parallel.loader import build_loaders
from tests.helpers import free_port
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


def hf_model(hf_dir: Path, tie: bool) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=20000.0,
                         max_position_embeddings=64, tie_word_embeddings=tie, eos_token_id=EOS, bos_token_id=None)
    torch.manual_seed(7)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(hf_dir)
    return model


def hf_loss(model: LlamaForCausalLM, micro_batches) -> float:
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(model(mb.inputs).logits.flatten(0, 1), mb.targets.flatten())
                  for mb in micro_batches]
    return float(torch.stack(losses).mean())


def pretrain_train(procs: int, spec: Path, tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "TMPDIR": str(tmp),
           "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "orchestrator.cli", "train", str(spec)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp)


@pytest.mark.parametrize("layout,tie", [("parallel.tp=2", False), ("parallel.pp=2", True)], ids=["tp2", "pp2"])
def test_import_train_export_matches_transformers(layout: str, tie: bool, shards: Path, tmp_path: Path,
                                                  capsys) -> None:
    reference = hf_model(tmp_path / "hf", tie)
    spec_file, ckpt = tmp_path / "job.yaml", tmp_path / "ckpt"
    assert pretrain(["import", str(tmp_path / "hf"), str(REPO / "examples" / "tiny.yaml"), *RUN, layout,
                     f"data.path={shards}", f"checkpoint.dir={ckpt}", "-o", str(spec_file)]) == 0
    spec = load_spec(spec_file)
    assert (spec.model.vocab_size, spec.model.ffn_dim, spec.model.tie_embeddings) == (260, 160, tie)
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
    exported = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    # export: transformers on the gathered weights gives the run's own validation loss after the step
    after = hf_loss(exported, val_batch)
    assert history["eval"][0]["loss"] == pytest.approx(after, abs=ATOL)
    assert abs(after - hf_loss(reference, val_batch)) > 10 * ATOL  # the step did change the weights
    assert exported.config.tie_word_embeddings is tie
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == EOS

    if tie:  # generation from the checkpoint gathers it the same way: greedy gives the exported model's text
        capsys.readouterr()
        argv = ["--prompt", "In the beginning", "--prompt", "def", "--temperature", "0", "--max-new-tokens", "8"]
        assert pretrain(["generate", str(ckpt), *argv]) == 0
        from_checkpoint = capsys.readouterr().out.splitlines()
        assert pretrain(["generate", str(tmp_path / "out"), *argv]) == 0
        from_export = capsys.readouterr().out.splitlines()
        assert from_checkpoint[:2] == from_export[:2] and from_checkpoint[0].startswith("[1] In the beginning")
        assert "tokens/s" in from_checkpoint[2]
