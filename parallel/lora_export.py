"""A LoRA run's checkpoint out of the project: merged into the weights, or as a PEFT adapter directory.

    pretrain export ckpt out/merged                  # W + (alpha/rank)·B·A per adapted projection: a plain HF model
    pretrain export ckpt out/adapter --lora-adapter  # adapter_config.json + adapter_model.safetensors for `peft`

Both are writers for `parallel.consolidate`, which hands rank 0 the full state dict, adapters included (under the
names `parallel.lora` gives them: `layers.0.self_attn.q_proj.lora_A.weight`). The adapter directory is PEFT's LoRA
format: tensors named `base_model.model.<the Hugging Face name>` (the adapter's name left out, as PEFT saves them),
and a config whose `base_model_name_or_path` is the imported model's directory, so
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), OUT)` computes what the run's model does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from orchestrator.spec import JobSpec, LoraConfig
from parallel.consolidate import HFWriter, StateWriter
from parallel.hf import HFExport, save_hf, to_hf_name
from parallel.lora import is_adapter, target_names
from parallel.model import ModelDims

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def merge_adapters(state: dict[str, torch.Tensor], lora: LoraConfig) -> dict[str, torch.Tensor]:
    """The model's weights with each adapter folded in (W + scaling·B·A, in fp64), the adapters dropped."""
    scaling = lora.alpha / lora.rank
    merged = {name: value for name, value in state.items() if not is_adapter(name)}
    for name in state:
        if name.endswith(".lora_A.weight"):
            module = name.removesuffix(".lora_A.weight")
            a, b = state[name].double(), state[f"{module}.lora_B.weight"].double()
            weight = merged[f"{module}.weight"]
            merged[f"{module}.weight"] = (weight.double() + scaling * (b @ a)).to(weight.dtype)
    return merged


@dataclass
class MergedHFWriter:
    """A Hugging Face model directory of the adapted model (adapters merged)."""

    directory: str
    how: HFExport
    lora: LoraConfig

    def __call__(self, state: dict[str, torch.Tensor], dims: ModelDims) -> list[str]:
        return save_hf(self.directory, merge_adapters(state, self.lora), dims, self.how)


def model_writer(spec: JobSpec, directory: str, how: HFExport) -> StateWriter:
    """How a checkpoint of `spec`'s run becomes a Hugging Face directory (`pretrain export`, `pretrain generate`):
    the model as trained, which under LoRA is the imported weights with the adapters merged."""
    return MergedHFWriter(directory, how, spec.model.lora) if spec.model.lora.rank else HFWriter(directory, how)


@dataclass
class PeftAdapterWriter:
    """A PEFT LoRA adapter directory for the model in `base` (the imported Hugging Face directory)."""

    directory: str
    lora: LoraConfig
    base: str
    dtype: torch.dtype = torch.float32

    def __call__(self, state: dict[str, torch.Tensor], dims: ModelDims) -> list[str]:
        os.makedirs(self.directory, exist_ok=True)
        tensors = {f"base_model.model.{to_hf_name(name)}": value.to(self.dtype).contiguous()
                   for name, value in state.items() if is_adapter(name)}
        save_file(tensors, os.path.join(self.directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": self.base,
                  "r": self.lora.rank, "lora_alpha": self.lora.alpha, "lora_dropout": self.lora.dropout,
                  "target_modules": target_names(self.lora), "bias": "none", "fan_in_fan_out": False,
                  "use_rslora": False, "init_lora_weights": True, "inference_mode": True}
        with open(os.path.join(self.directory, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        return [ADAPTER_WEIGHTS, ADAPTER_CONFIG]
