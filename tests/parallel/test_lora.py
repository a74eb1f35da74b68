"""LoRA continued pretraining of an imported Hugging Face Llama, through the real commands, under FSDP and DTensor TP.

A random Llama (transformers' own class, saved with save_pretrained) is imported with adapters of rank 2 on all
seven projections (`pretrain import ... model.lora.rank=2`) and trained on real shards: 4 steps in one process
(checkpoints at 2 and 4), the same 4 steps under dp2 (FSDP, ZeRO-3) in a 2-rank torchrun launch, and under tp2
resumed from the single process's step-2 checkpoint in another: each must give the
single process's losses (the layout tests' 1e-5), which also makes the resume exact across a change of layout.

What comes out is checked against transformers and peft: the run's own model (ours, the imported weights plus the
adapters read from the checkpoint's DCP files) has the run's validation loss; `pretrain export` merges the adapters
and transformers on that directory gives our logits within 1e-5; `pretrain export --lora-adapter` writes a PEFT
directory that `PeftModel.from_pretrained` loads on the imported directory, with the same logits; the imported
weights are untouched (the merged export minus scale·B·A is the import). The checkpoint holds adapters and their
Adam moments only (no frozen weight, no state for one), a fraction of the model's size, and those moments are the
planner's optimizer memory; a changed base is refused on resume.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import shutil
from pathlib import Path

import peft
import pytest
import torch
import transformers as tf
import yaml
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from orchestrator.cli import main as pretrain
from orchestrator.errors import CheckpointError, SpecError
from orchestrator.planner.counting import lora_params
from orchestrator.planner.memory_native import native_memory
from orchestrator.spec import spec_to_yaml
from orchestrator.validate import load_spec, parse_spec
from parallel.callbacks import read_history
from parallel.hf import load_hf_model
from parallel.loader import build_loaders
from parallel.lora import apply_lora
from parallel.lora_base import check_same_base
from parallel.model import build_model
from parallel.restore import check_same_model
from tests.helpers import RTOL
from tests.parallel.test_hf_layouts import byte_tokenizer, pretrain_train
from tests.shards import EOS, write_shards

REPO = Path(__file__).resolve().parents[2]
LORA = ["model.lora.rank=2", "model.lora.alpha=8"]
RUN = ["parallel.backend=native", "data.seq_len=32", "parallel.precision=fp32", "parallel.grad_accum=2",
       "schedule.steps=4", "schedule.warmup_steps=0", "schedule.eval_every=4", "schedule.eval_batches=1",
       "schedule.log_every=1", "optim.lr=2e-2", "optim.min_lr=2e-2", "checkpoint.every=2",
       "checkpoint.async_save=false", "metrics.enabled=false", *LORA]
# The same global batch of 8 sequences in every layout (dp and the global batch resolved again for each).
RESOLVE = ["parallel.dp=0", "parallel.global_batch_size=0"]
SINGLE = [*RESOLVE, "parallel.micro_batch_size=4"]
DP2 = [*RESOLVE, "parallel.micro_batch_size=2", "parallel.zero_stage=3"]
TP2 = [*RESOLVE, "parallel.micro_batch_size=4", "parallel.tp=2"]

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("lora")]


def dcp_state(step_dir: Path, tmp: Path) -> dict:
    """A native checkpoint's DCP files as one plain state dict (model and optimizer), read without a process group."""
    out = tmp / f"{step_dir.parent.name}-{step_dir.name}.pt"
    dcp_to_torch_save(step_dir / "engine" / "dcp", out)
    return torch.load(out, weights_only=False)


def imported_llama(directory: Path) -> None:
    """A random Llama as transformers initialises one (std 0.02), saved as a Hugging Face directory."""
    config = tf.LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                            tie_word_embeddings=False, eos_token_id=EOS, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(7)
    tf.LlamaForCausalLM(config).save_pretrained(directory)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    shards = write_shards(tmp / "shards", seq_len=32, rows=120)
    byte_tokenizer(shards / "tokenizer.json")
    imported_llama(tmp / "hf")
    byte_tokenizer(tmp / "hf" / "tokenizer.json")
    spec_file = tmp / "job.yaml"
    assert pretrain(["import", str(tmp / "hf"), str(REPO / "examples" / "tiny.yaml"), *RUN, f"data.path={shards}",
                     "-o", str(spec_file)]) == 0
    single, dp2, tp2 = tmp / "single", tmp / "dp2", tmp / "tp2"
    assert pretrain(["train", str(spec_file), *SINGLE, f"checkpoint.dir={single}"]) == 0
    (tp2 / "step_2").parent.mkdir()
    shutil.copytree(single / "step_2", tp2 / "step_2")
    (tp2 / "latest").write_text("step_2\n")
    launched = {}
    for name, overrides in (("dp2", [*DP2, f"checkpoint.dir={dp2}"]), ("tp2", [*TP2, f"checkpoint.dir={tp2}"])):
        layout_file = tmp / f"{name}.yaml"
        layout_file.write_text(spec_to_yaml(load_spec(spec_file, [*overrides, "resources.gpus_per_node=2"])))
        done = pretrain_train(2, layout_file, tmp)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
        launched[name] = done.stdout
    return tmp, load_spec(single / "step_4" / "spec.yaml"), launched  # the single process's spec


def test_lora_trains_under_dp2_and_resumes_under_tp2_as_in_one_process(runs) -> None:
    tmp, spec, launched = runs
    single = read_history(str(tmp / "single" / "history.jsonl"))
    expected = [s["loss"] for s in single["step"]]
    assert len(expected) == 4 and expected[-1] < expected[0], "the adapters should learn"
    dp2 = [s["loss"] for s in read_history(str(tmp / "dp2" / "history.jsonl"))["step"]]
    torch.testing.assert_close(torch.tensor(dp2), torch.tensor(expected), rtol=RTOL, atol=0)
    assert "resumed from checkpoint" in launched["tp2"] and "(step 2)" in launched["tp2"]
    tp2 = read_history(str(tmp / "tp2" / "history.jsonl"))["step"]
    assert [s["step"] for s in tp2] == [3, 4]
    torch.testing.assert_close(torch.tensor([s["loss"] for s in tp2]), torch.tensor(expected[2:]), rtol=RTOL, atol=0)
    for run in ("dp2", "tp2"):
        evaluation = read_history(str(tmp / run / "history.jsonl"))["eval"][-1]["loss"]
        assert evaluation == pytest.approx(single["eval"][-1]["loss"], rel=RTOL)


def test_checkpoint_holds_only_adapters_and_their_moments_as_planned(runs) -> None:
    tmp, spec, _ = runs
    state = dcp_state(tmp / "dp2" / "step_4", tmp)
    adapters = state["model"]
    assert adapters and all(".lora_A." in n or ".lora_B." in n for n in adapters), sorted(adapters)[:4]
    trained = sum(t.numel() for t in adapters.values())
    # 2 layers × rank 2 × (in + out) of q, k, v, o, gate, up, down
    shapes = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 160), (64, 160), (160, 64)]
    assert trained == lora_params(spec.model)[0] == 2 * 2 * sum(i + o for i, o in shapes)
    moments = state["optim"]["state"]
    assert set(moments) == set(adapters)
    optimizer_bytes = sum(4 * s[k].numel() for s in moments.values() for k in ("exp_avg", "exp_avg_sq"))
    dp2 = load_spec(tmp / "dp2.yaml")
    planned = native_memory(dp2, dp2.parallel)
    assert planned.optimizer * 2 == optimizer_bytes == 8 * trained
    assert planned.gradients == 4 * trained // 2  # ZeRO-3: the adapters' gradients sharded, none for the base
    # What the checkpoint stores: the tensors its DCP metadata lists (the files add DCP's per-tensor framing, which
    # at this size is most of them).
    listed = FileSystemReader(str(tmp / "dp2" / "step_4" / "engine" / "dcp")).read_metadata().state_dict_metadata
    stored = sum(m.size.numel() * m.properties.dtype.itemsize for m in listed.values()
                 if isinstance(m, TensorStorageMetadata))
    base_bytes = (tmp / "hf" / "model.safetensors").stat().st_size
    assert stored < 0.15 * base_bytes, f"{stored} bytes of tensors stored against the model's {base_bytes}"


def our_model(tmp: Path, spec) -> torch.nn.Module:
    """The run's model: the imported weights, with the adapters of the single process's last checkpoint."""
    model = load_hf_model(str(tmp / "hf"))
    apply_lora(model, spec.model.lora, spec.checkpoint.init_from)
    with torch.no_grad():
        for name, value in dcp_state(tmp / "single" / "step_4", tmp)["model"].items():
            model.get_parameter(name).copy_(value)
    return model.eval()


def test_exports_merged_and_as_peft_adapter_give_the_runs_logits(runs, capsys) -> None:
    tmp, spec, _ = runs
    ours = our_model(tmp, spec)
    _, val_loader = build_loaders(spec, dp_rank=0, dp_size=1)
    batch = val_loader.next_step()
    val_loader.close()
    with torch.no_grad():
        logits = torch.cat([ours(mb.inputs) for mb in batch])
        loss = torch.stack([torch.nn.functional.cross_entropy(ours(mb.inputs).flatten(0, 1), mb.targets.flatten())
                            for mb in batch]).mean()
    run_eval = read_history(str(tmp / "single" / "history.jsonl"))["eval"][-1]["loss"]
    assert float(loss) == pytest.approx(run_eval, abs=1e-5)

    assert pretrain(["export", str(tmp / "single"), str(tmp / "merged")]) == 0
    assert pretrain(["export", str(tmp / "single"), str(tmp / "adapter"), "--lora-adapter"]) == 0
    assert sorted(os.listdir(tmp / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    inputs = torch.cat([mb.inputs for mb in batch])
    merged = tf.AutoModelForCausalLM.from_pretrained(tmp / "merged").eval()
    base = tf.AutoModelForCausalLM.from_pretrained(tmp / "hf").eval()
    adapted = peft.PeftModel.from_pretrained(base, tmp / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(inputs).logits, logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(adapted(inputs).logits, logits, rtol=0, atol=1e-5)

    # the imported weights are untouched: the merged export less its adapters' update is the import
    imported, exported = load_file(tmp / "hf" / "model.safetensors"), load_file(tmp / "merged" / "model.safetensors")
    adapter = load_file(tmp / "adapter" / "adapter_model.safetensors")
    scaling = spec.model.lora.alpha / spec.model.lora.rank
    for name, weight in imported.items():
        module = f"base_model.model.{name.removesuffix('.weight')}"
        a = adapter.get(f"{module}.lora_A.weight")
        update = 0 if a is None else scaling * adapter[f"{module}.lora_B.weight"] @ a
        torch.testing.assert_close(exported[name] - update, weight, rtol=0, atol=1e-6, msg=name)
    assert sum(k.endswith("lora_A.weight") for k in adapter) == 2 * 7

    # generating from the checkpoint uses the adapted model: the merged export's continuation token for token, not
    # the imported model's
    texts = []
    for source in (tmp / "single", tmp / "merged", tmp / "hf"):
        capsys.readouterr()
        assert pretrain(["generate", str(source), "--prompt", "In the beginning", "--temperature", "0",
                         "--max-new-tokens", "8", "--device", "cpu"]) == 0
        texts.append(capsys.readouterr().out.rsplit("\npretrain generate: ", 1)[0])
    assert texts[0] == texts[1] != texts[2] and texts[0].startswith("[1] In the beginning")


def test_resume_takes_a_moved_base_and_refuses_a_changed_one(runs) -> None:
    tmp, spec, _ = runs
    spec = copy.deepcopy(spec)
    moved = tmp / "hf-moved"
    shutil.copytree(tmp / "hf", moved)
    spec.checkpoint.init_from = str(moved)
    check_same_base(str(tmp / "single" / "step_4"), spec)  # the same files elsewhere: the same base
    changed = tmp / "hf-changed"
    shutil.copytree(tmp / "hf", changed)
    weights = load_file(changed / "model.safetensors")
    weights["model.norm.weight"] += 1
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    spec.checkpoint.init_from = str(changed)
    with pytest.raises(CheckpointError, match=r"lora_base.json: the adapters were trained on .*hf \(sha256 .*but "
                                              r"checkpoint.init_from now gives .*hf-changed"):
        check_same_base(str(tmp / "single" / "step_4"), spec)


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.lora.targets=q_proj,qkv"], r"model.lora.targets: 'qkv' not a projection of the model; allowed: q_proj"),
    (["parallel.backend=deepspeed"], r"model.lora.rank: 2 needs parallel.backend=native"),
    (["parallel.float8=tensorwise"], r"parallel.float8: tensorwise with model.lora.rank=2"),
    (["model.lora.rank=512"], r"model.lora.rank: 512 is above model.dim=256"),
    (["model.lora.dropout=1"], r"model.lora.dropout: got 1.0, must be ≤ 0.9"),
    (["model.parametrization=mup", "model.mup_base_dim=256"], r"model.lora.rank: 2 with model.parametrization=mup"),
    (["model.lora.targets=''"], r"model.lora.targets: empty with model.lora.rank=2"),
])
def test_validation_refuses_what_lora_cannot_run(overrides: list[str], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec({}, overrides=[*LORA, "parallel.backend=native", *overrides])


def test_a_checkpoint_from_before_lora_resumes_and_one_of_other_adapters_is_refused(tmp_path: Path) -> None:
    """A spec.yaml written before model.lora existed ran without adapters: it resumes a run without them, and a run
    that adds them is told what differs."""
    spec = parse_spec({}, overrides=["model.vocab_size=128"])
    saved = yaml.safe_load(spec_to_yaml(spec))
    del saved["model"]["lora"]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(saved))
    check_same_model(str(tmp_path / "spec.yaml"), spec)
    with_lora = parse_spec({}, overrides=["model.vocab_size=128", *LORA])
    with pytest.raises(CheckpointError, match=r"model.lora: \{'rank': 0, .* in the checkpoint, \{'rank': 2, "):
        check_same_model(str(tmp_path / "spec.yaml"), with_lora)


@pytest.mark.parametrize(("change", "message"), [
    ({"lora": {"rank": 0}}, r"--lora-adapter: .*step_4 is a checkpoint of a run without adapters"),
    ({"init_from": ""}, r"--lora-adapter: the adapters of .*step_4 were trained on random weights"),
])
def test_export_refuses_an_adapter_directory_it_cannot_write(runs, change: dict, message: str, tmp_path: Path,
                                                            capsys) -> None:
    tmp, _, _ = runs
    step = tmp_path / "ckpt" / "step_4"
    shutil.copytree(tmp / "single" / "step_4", step)
    saved = yaml.safe_load((step / "spec.yaml").read_text())
    saved["model"]["lora"].update(change.get("lora", {}))
    saved["checkpoint"].update({k: v for k, v in change.items() if k != "lora"})
    (step / "spec.yaml").write_text(yaml.safe_dump(saved))
    assert pretrain(["export", str(step), str(tmp_path / "out"), "--lora-adapter"]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_adapters_on_random_weights_are_allowed_with_a_warning(caplog) -> None:
    spec = parse_spec({}, overrides=["model.vocab_size=128", *LORA, "parallel.backend=native"])
    model = build_model(spec.model)
    with caplog.at_level(logging.WARNING, logger="parallel.lora"):
        apply_lora(model, spec.model.lora, spec.checkpoint.init_from)
    assert "model.lora.rank=2 without checkpoint.init_from" in caplog.text
    assert sum(".lora_A." in n for n, _ in model.named_parameters()) == spec.model.n_layers * 7
