"""The Hugging Face architectures the model can be, and each one's config.json mapped to `ModelDims` and back.

    dims = dims_from_hf_config(config, "Qwen3-0.6B/config.json")    # or a UserError naming every key it cannot take
    family_name(config)                                               # the spec's model.family: llama3, qwen3, ...
    config = hf_config(dims, "qwen3", Identity(max_positions=40960))  # Qwen3ForCausalLM's config.json

Each architecture fixes some of the model's switches (Qwen2 always has q/k/v biases, OLMo 2 always norms after
attention and MLP and over all heads) and reads others from its config.json (Mistral's window, Gemma 2's
soft-caps and the layers that slide); `Family` says which. Weight names are the same in every dense family (the
model names its parameters as they do), so only Gemma's norms need converting: Gemma stores w in x̂·(1 + w), the
model computes x̂·w (`Family.norm_offset`). The mixtures of experts (Qwen3-MoE, Mixtral) store each expert's
projections as its own 2-D tensor, as `save_pretrained` writes them (transformers 5 fuses them in memory only),
where the model holds one 3-D parameter per projection: `Experts` names them, `parallel.hf` stacks and unstacks.
Keys config.json may leave out take the values transformers' config classes (5.24) give them, so a sparse
config.json means what it means to transformers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from orchestrator.config_parser import show
from orchestrator.errors import UserError
from parallel.model import ModelDims
from parallel.moe import MoEDims
from parallel.rope import RopeScaling

_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_HF_ACTIVATION = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}
# Llama's block: the switches an architecture has unless it says otherwise (attn_scale_dim 0: 1/sqrt(head_dim)).
_LLAMA_BLOCK: dict[str, Any] = {
    "norm_placement": "pre", "qkv_bias": False, "qk_norm": "none", "sliding_window": 0, "full_attention_every": 0,
    "attn_softcap": 0.0, "logit_softcap": 0.0, "attn_scale_dim": 0, "scale_embeddings": False}
# Keys some architectures read that the model has no computation for, when true.
_UNSUPPORTED_WHEN_TRUE = {
    "attention_bias": "biases on all four attention projections are not supported (only q/k/v biases, as Qwen2's)",
    "mlp_bias": "MLP biases are not supported",
    "use_sliding_window": "Qwen's sliding-window layers are not supported",
    "use_bidirectional_attention": "the model is causal only",
}
# Mixtures of experts transformers has that the model cannot be, and why: named rather than only "not supported".
_UNSUPPORTED_MOE = {
    "qwen2_moe": "shared_expert_gate: Qwen2-MoE scales its shared expert by a learned sigmoid gate, which the "
                 "model's shared experts do not have",
    "deepseek_v3": "DeepSeek-V3's multi-head latent attention and grouped sigmoid routing are not supported",
    "olmoe": "OLMoE's norms over all query and key heads in a mixture of experts are not supported",
}


def _shown(value: Any) -> str:
    """A config value as config.json spells true, false and null; others as repr."""
    return json.dumps(value) if value is None or isinstance(value, bool) else show(value)


@dataclass(frozen=True)
class Identity:
    """What a model's config.json says beyond its computation: the context it is meant for and its special tokens."""

    max_positions: int = 2048
    bos_id: int | None = None
    eos_id: int | list[int] | None = None
    pad_id: int | None = None


@dataclass(frozen=True)
class Experts:
    """How an architecture stores a mixture-of-experts block: the block's module under `layers.{i}`, each expert's
    linears (the model's 3-D gate_proj / up_proj / down_proj, one [ffn, dim] or [dim, ffn] slice per expert), and
    the routing switches it always has."""

    module: str  # mlp (Qwen3-MoE) or block_sparse_moe (Mixtral)
    linears: dict[str, str]  # the model's expert parameter → the expert's linear: gate_proj → w1 (Mixtral)
    fixed: dict[str, Any]  # MoEDims switches this architecture always has

    def stored_names(self, name: str, num_experts: int) -> list[str] | None:
        """The tensors a file holds the model's parameter `name` in, when it is this block's (else None)."""
        if m := _OUR_EXPERTS.fullmatch(name):
            layer, linear = m.groups()
            return [f"model.layers.{layer}.{self.module}.experts.{e}.{self.linears[linear]}.weight"
                    for e in range(num_experts)]
        if m := _OUR_ROUTER.fullmatch(name):
            return [f"model.layers.{m.group(1)}.{self.module}.gate.weight"]
        return None

    def our_name(self, stored: str) -> tuple[str, int] | None:
        """(the model's parameter, the expert's index; -1 for the router) of a stored tensor of this block."""
        module = re.escape(self.module)
        if m := re.fullmatch(rf"model\.layers\.(\d+)\.{module}\.experts\.(\d+)\.(\w+)\.weight", stored):
            layer, expert, linear = m.groups()
            ours = {v: k for k, v in self.linears.items()}.get(linear)
            return (f"layers.{layer}.mlp.experts.{ours}", int(expert)) if ours else None
        if m := re.fullmatch(rf"model\.layers\.(\d+)\.{module}\.gate\.weight", stored):
            return f"layers.{m.group(1)}.mlp.gate.weight", -1
        return None


_OUR_EXPERTS = re.compile(r"layers\.(\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj)")
_OUR_ROUTER = re.compile(r"layers\.(\d+)\.mlp\.gate\.weight")


@dataclass(frozen=True)
class Family:
    """One transformers architecture: the switches it fixes, how its own keys read and write, its defaults."""

    model_type: str
    architecture: str
    fixed: dict[str, Any]  # ModelDims switches this architecture always has
    defaults: dict[str, Any]  # transformers' values for keys a config.json may leave out
    refused: tuple[str, ...] = ()  # keys of _UNSUPPORTED_WHEN_TRUE it reads
    read: Callable[[dict[str, Any], list[str]], dict[str, Any]] = lambda config, problems: {}
    write: Callable[[ModelDims], dict[str, Any]] = lambda dims: {}
    activation_key: str = "hidden_act"
    norm_offset: float = 0.0  # stored norm weight = the model's - norm_offset
    extra: dict[str, Any] = field(default_factory=dict)  # constant keys of its config.json
    experts: Experts | None = None  # a mixture of experts: how it stores them (None: a dense architecture)

    def misfit(self, dims: ModelDims) -> str | None:
        """The first switch of `dims` this architecture cannot express, as `field=value`, or None."""
        have = _normalised(dims)
        for name, value in self.fixed.items():
            if have[name] != value:
                return f"{name}={have[name]!r} (always {value!r} in {self.model_type})"
        if self.experts is None or dims.moe is None:
            return None if self.experts is None and dims.moe is None else (
                f"moe.num_experts={dims.moe.num_experts if dims.moe else 0} ({self.model_type} is "
                f"{'a mixture of experts' if self.experts else 'dense'})")
        for name, value in self.experts.fixed.items():
            if getattr(dims.moe, name) != value:
                return f"moe.{name}={getattr(dims.moe, name)!r} (always {value!r} in {self.model_type})"
        return None

    def stored_names(self, name: str, dims: ModelDims) -> list[str]:
        """The tensors a file of this architecture holds the model's parameter `name` in: one, or under a mixture
        of experts one per expert of a 3-D expert parameter (stacked on dim 0 in the model)."""
        if self.experts is not None and dims.moe is not None:
            stored = self.experts.stored_names(name, dims.moe.num_experts)
            if stored is not None:
                return stored
        return [name if name == "lm_head.weight" else f"model.{name}"]

    def our_name(self, stored: str) -> tuple[str, int | None]:
        """The model's parameter a stored tensor belongs to, and its expert's index (None: the whole parameter)."""
        found = self.experts.our_name(stored) if self.experts is not None else None
        if found is not None:
            return found[0], None if found[1] < 0 else found[1]
        return stored.removeprefix("model."), None

    def stored_norm(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.float() - self.norm_offset if self.norm_offset else tensor

    def model_norm(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.float() + self.norm_offset if self.norm_offset else tensor


def _normalised(dims: ModelDims) -> dict[str, Any]:
    """The switches with equivalent spellings made one: attention scaled by head_dim is 0, no window no pattern."""
    return {name: getattr(dims, name) for name in _LLAMA_BLOCK} | {
        "attn_scale_dim": 0 if dims.attn_scale_dim in (0, dims.head_dim) else dims.attn_scale_dim,
        "full_attention_every": dims.full_attention_every if dims.sliding_window else 0}


# ---------------------------------------------------------------------------------------------- per family


def _read_mistral(config: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    return {"sliding_window": config["sliding_window"] or 0}


def _write_mistral(dims: ModelDims) -> dict[str, Any]:
    return {"sliding_window": dims.sliding_window or None}


def _read_gemma2(config: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    window, every = config["sliding_window"] or 0, 0
    types = config.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(config["num_hidden_layers"])]
    full = [t == "full_attention" for t in types]
    if len(types) != config["num_hidden_layers"] or any(t not in ("sliding_attention", "full_attention")
                                                         for t in types):
        problems.append(f"layer_types={show(types)}: expected num_hidden_layers={config['num_hidden_layers']} "
                        "entries, each 'sliding_attention' or 'full_attention'")
    elif all(full):
        window = 0
    elif any(full) and window:
        every = full.index(True) + 1
        if full != [(i + 1) % every == 0 for i in range(len(full))]:
            problems.append(f"layer_types={show(types)}: only every n-th layer attending fully is supported "
                            "(Gemma 2 alternates: sliding, full, sliding, ...)")
    return {"sliding_window": window, "full_attention_every": every,
            "attn_softcap": float(config["attn_logit_softcapping"] or 0.0),
            "logit_softcap": float(config["final_logit_softcapping"] or 0.0),
            "attn_scale_dim": int(config["query_pre_attn_scalar"])}


def _write_gemma2(dims: ModelDims) -> dict[str, Any]:
    return {"query_pre_attn_scalar": dims.attn_scale_dim or dims.head_dim,
            "attn_logit_softcapping": dims.attn_softcap or None, "final_logit_softcapping": dims.logit_softcap or None,
            "sliding_window": dims.sliding_window or None,
            "layer_types": ["sliding_attention" if dims.window(i) else "full_attention" for i in range(dims.n_layers)]}


def _write_qwen(dims: ModelDims) -> dict[str, Any]:
    return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": dims.n_layers,
            "layer_types": ["full_attention"] * dims.n_layers}


def _read_experts(config: dict[str, Any], problems: list[str], experts: int, ffn: int, norm_topk: bool,
                  sparse: list[bool]) -> dict[str, Any]:
    """The MoE dims of a block of `experts` experts of width `ffn`, on the layers `sparse` marks."""
    top_k = config["num_experts_per_tok"]
    if top_k > experts:
        problems.append(f"num_experts_per_tok={top_k}: more than the {experts} experts")
    if config.get("router_jitter_noise"):
        problems.append(f"router_jitter_noise={show(config['router_jitter_noise'])}: routing noise is not "
                        "supported (only 0)")
    every = config.get("decoder_sparse_step") or 1
    for first in range(len(sparse)):
        moe = MoEDims(num_experts=experts, top_k=top_k, ffn_dim=ffn, every_n_layers=every, first_dense_layers=first,
                      score="softmax", norm_topk=norm_topk)
        if [moe.is_moe(i) for i in range(len(sparse))] == sparse:
            return {"moe": moe}
    problems.append(f"mlp_only_layers={show(config.get('mlp_only_layers'))}: with decoder_sparse_step={every}, "
                    "only the first layers dense is supported (model.moe.first_dense_layers), and at least one layer "
                    "must be a mixture of experts")
    return {}


def _read_qwen3_moe(config: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    only = config.get("mlp_only_layers") or []
    every = config.get("decoder_sparse_step") or 1
    experts = config.get("num_experts", config.get("num_local_experts", 128))
    sparse = [i not in only and (i + 1) % every == 0 for i in range(config["num_hidden_layers"])]
    return _read_experts(config, problems, experts, config["moe_intermediate_size"],
                         bool(config["norm_topk_prob"]), sparse)


def _write_qwen3_moe(dims: ModelDims) -> dict[str, Any]:
    moe = dims.moe
    every = moe.every_n_layers
    return {**_write_qwen(dims), "num_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
            "moe_intermediate_size": moe.ffn_dim, "norm_topk_prob": moe.norm_topk,
            "decoder_sparse_step": every, "output_router_logits": False,
            "mlp_only_layers": [i for i in range(dims.n_layers) if (i + 1) % every == 0 and not dims.is_moe(i)]}


def _read_mixtral(config: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    n = config["num_hidden_layers"]
    return {**_read_mistral(config, problems), **_read_experts(
        config, problems, config["num_local_experts"], config["intermediate_size"], True, [True] * n)}


def _write_mixtral(dims: ModelDims) -> dict[str, Any]:
    return {**_write_mistral(dims), "num_local_experts": dims.moe.num_experts, "num_experts_per_tok": dims.moe.top_k,
            "intermediate_size": dims.moe.ffn_dim, "router_jitter_noise": 0.0, "output_router_logits": False}


# Routing both always have: softmax scores over the experts, no shared experts, no capacity limit.
_ROUTING = {"score": "softmax", "num_shared_experts": 0}
_IDS = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM", _LLAMA_BLOCK, {
        "rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "num_key_value_heads": None, "head_dim": None,
        "tie_word_embeddings": False, **_IDS, "bos_token_id": 1, "eos_token_id": 2},
        refused=("attention_bias", "mlp_bias"), extra={"attention_bias": False, "mlp_bias": False}),
    Family("qwen2", "Qwen2ForCausalLM", {**_LLAMA_BLOCK, "qkv_bias": True}, {
        "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "num_key_value_heads": 32, "head_dim": None,
        "tie_word_embeddings": False, **_IDS}, refused=("use_sliding_window",), write=_write_qwen),
    Family("qwen3", "Qwen3ForCausalLM", {**_LLAMA_BLOCK, "qk_norm": "head"}, {
        "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "num_key_value_heads": 32, "head_dim": 128,
        "tie_word_embeddings": False, **_IDS}, refused=("attention_bias", "use_sliding_window"), write=_write_qwen,
        extra={"attention_bias": False}),
    Family("mistral", "MistralForCausalLM", {k: v for k, v in _LLAMA_BLOCK.items() if k != "sliding_window"}, {
        "rms_norm_eps": 1e-6, "max_position_embeddings": 131072, "num_key_value_heads": 8, "head_dim": None,
        "tie_word_embeddings": False, "sliding_window": 4096, **_IDS, "bos_token_id": 1, "eos_token_id": 2},
        read=_read_mistral, write=_write_mistral),
    Family("olmo2", "Olmo2ForCausalLM", {**_LLAMA_BLOCK, "norm_placement": "post", "qk_norm": "full"}, {
        "rms_norm_eps": 1e-5, "max_position_embeddings": 2048, "num_key_value_heads": None, "head_dim": None,
        "tie_word_embeddings": False, **_IDS, "eos_token_id": 50279, "pad_token_id": 1},
        refused=("attention_bias",), extra={"attention_bias": False}),
    Family("gemma2", "Gemma2ForCausalLM", {
        "norm_placement": "sandwich", "qkv_bias": False, "qk_norm": "none", "scale_embeddings": True}, {
        "rms_norm_eps": 1e-6, "max_position_embeddings": 8192, "num_key_value_heads": 4, "head_dim": 256,
        "tie_word_embeddings": True, "sliding_window": 4096, "query_pre_attn_scalar": 256,
        "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh",
        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0},
        refused=("attention_bias", "use_bidirectional_attention"), read=_read_gemma2, write=_write_gemma2,
        activation_key="hidden_activation", norm_offset=1.0, extra={"attention_bias": False}),
    Family("qwen3_moe", "Qwen3MoeForCausalLM", {**_LLAMA_BLOCK, "qk_norm": "head"}, {
        "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "num_key_value_heads": 4, "head_dim": None,
        "tie_word_embeddings": False, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
        "decoder_sparse_step": 1, "norm_topk_prob": False, "router_aux_loss_coef": 0.001, **_IDS},
        refused=("attention_bias", "use_sliding_window"), read=_read_qwen3_moe, write=_write_qwen3_moe,
        extra={"attention_bias": False}, experts=Experts(
            "mlp", {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}, _ROUTING)),
    Family("mixtral", "MixtralForCausalLM", {k: v for k, v in _LLAMA_BLOCK.items() if k != "sliding_window"}, {
        "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "num_key_value_heads": 8, "head_dim": None,
        "tie_word_embeddings": False, "sliding_window": None, "rope_theta": 1e6, "num_local_experts": 8,
        "num_experts_per_tok": 2, "router_aux_loss_coef": 0.001, **_IDS, "bos_token_id": 1, "eos_token_id": 2},
        read=_read_mixtral, write=_write_mixtral, experts=Experts(
            "block_sparse_moe", {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"},
            {**_ROUTING, "norm_topk": True, "every_n_layers": 1, "first_dense_layers": 0})),
)}
# The spec's model.family of each architecture (Llama's is decided by its RoPE, `family_name`).
_SPEC_FAMILY = {"qwen2": "qwen2", "qwen3": "qwen3", "mistral": "mistral", "olmo2": "olmo2", "gemma2": "gemma2",
                "qwen3_moe": "qwen3", "mixtral": "mistral"}


# ---------------------------------------------------------------------------------------------- reading


def family_of(config: dict[str, Any], source: str) -> Family:
    model_type = config.get("model_type")
    if model_type in _UNSUPPORTED_MOE:
        raise UserError(f"{source}: model_type={_shown(model_type)}: not supported: {_UNSUPPORTED_MOE[model_type]} "
                        f"(mixtures of experts: {', '.join(f for f in FAMILIES if FAMILIES[f].experts)})")
    if model_type not in FAMILIES:
        raise UserError(f"{source}: model_type={_shown(model_type)}: not a supported architecture (one of "
                        f"{', '.join(FAMILIES)})")
    return FAMILIES[model_type]


def with_defaults(config: dict[str, Any], family: Family) -> dict[str, Any]:
    """config.json with the keys it leaves out set as transformers sets them."""
    full = {**family.defaults, **config}
    full["num_key_value_heads"] = full["num_key_value_heads"] or full.get("num_attention_heads")
    return full


def _rope(config: dict[str, Any], problems: list[str]) -> tuple[float, RopeScaling]:
    """RoPE base and scaling from either spelling (transformers 4: rope_theta + rope_scaling, which wins when both
    are there; 5: rope_parameters)."""
    where = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    params = config.get(where) or {}
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor"))
    if partial is not None and partial != 1:
        problems.append(f"partial_rotary_factor={show(partial)}: RoPE over part of each head is not supported "
                        "(only 1.0)")
    original = params.get("original_max_position_embeddings") or config["max_position_embeddings"]
    factor = params.get("factor")
    if kind == "default":
        return theta, RopeScaling()
    if kind == "linear":
        return theta, RopeScaling("linear", float(factor or 1.0))
    if kind == "llama3":
        return theta, RopeScaling("llama3", float(factor or 1.0), original, float(params.get("low_freq_factor", 1.0)),
                                  float(params.get("high_freq_factor", 4.0)))
    if kind == "yarn":
        if params.get("truncate", True) is not True:
            problems.append(f"{where}.truncate={_shown(params['truncate'])}: YaRN without a truncated correction "
                            "range is not supported")
        factor = float(factor or config["max_position_embeddings"] / original)
        attention = params.get("attention_factor")
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if attention is None and mscale and mscale_all_dim:
            attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        return theta, RopeScaling("yarn", factor, original, beta_fast=float(params.get("beta_fast") or 32.0),
                                  beta_slow=float(params.get("beta_slow") or 1.0),
                                  attention_factor=float(attention or 0.0))
    problems.append(f"{where}.rope_type={_shown(kind)}: not supported (default, linear, llama3 or yarn)")
    return theta, RopeScaling()


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def dims_from_hf_config(config: dict[str, Any], source: str) -> ModelDims:
    """The model dims of a config.json, or one UserError listing everything in it the model cannot represent."""
    family = family_of(config, source)
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    problems = [f"{k}: missing" for k in required if not isinstance(config.get(k), int)]
    if problems:
        raise UserError(f"{source}: cannot load as a {family.model_type} model: " + "; ".join(problems))
    c = with_defaults(config, family)
    problems += [f"{key}=true: {_UNSUPPORTED_WHEN_TRUE[key]}" for key in family.refused if c.get(key)]
    if c.get("quantization_config"):
        problems.append(f"quantization_config={show(c['quantization_config'])}: quantized weights are not supported")
    act = c.get(family.activation_key, family.defaults.get(family.activation_key, "silu"))
    if act not in _ACTIVATIONS:
        problems.append(f"{family.activation_key}={_shown(act)}: not supported (silu or gelu_pytorch_tanh)")
    theta, scaling = _rope(c, problems)
    switches = {**family.fixed, **family.read(c, problems)}
    if problems:
        raise UserError(f"{source}: cannot load as a {family.model_type} model: " + "; ".join(problems))
    return ModelDims(
        vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
        n_heads=c["num_attention_heads"], n_kv_heads=c["num_key_value_heads"], ffn_dim=c["intermediate_size"],
        norm_eps=float(c["rms_norm_eps"]), rope_theta=theta, tie_embeddings=bool(c["tie_word_embeddings"]),
        init_std=float(c.get("initializer_range", 0.02)), head_dim=c["head_dim"] or 0,
        activation=_ACTIVATIONS[act], rope_scaling=scaling, **switches)


def family_name(config: dict[str, Any]) -> str:
    """The spec's model.family for a config.json: Llama with Llama 3's RoPE (scaled, or a base of 500000 or more)
    is llama3, other Llamas llama2."""
    if config["model_type"] != "llama":
        return _SPEC_FAMILY[config["model_type"]]
    params = config.get("rope_scaling") or config.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    llama3 = params.get("rope_type", params.get("type")) == "llama3" or theta >= 500000
    return "llama3" if llama3 else "llama2"


def training_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The job spec's `model.*` values for training on as the architecture was trained, which a user may change:
    a mixture of experts balanced by its auxiliary loss at its coefficient (its router has no place for
    auxiliary-loss-free balancing's bias, which would make the run's checkpoints unexportable to it)."""
    family = family_of(config, "config.json")
    if family.experts is None:
        return {}
    coef = float(with_defaults(config, family)["router_aux_loss_coef"])
    return {"moe.balance": "aux_loss", "moe.aux_loss_coef": coef}


def identity_of(config: dict[str, Any]) -> Identity:
    """The context and special tokens a config.json gives (transformers' defaults for the keys it leaves out)."""
    c = with_defaults(config, family_of(config, "config.json"))
    return Identity(c["max_position_embeddings"], c["bos_token_id"], c["eos_token_id"], c["pad_token_id"])


# ---------------------------------------------------------------------------------------------- writing


def family_for(dims: ModelDims, preferred: str = "custom") -> Family:
    """The architecture to export `dims` as: the spec's family's when it can express them, else the first that can.

    `preferred` is a spec model.family (llama2 and llama3 are transformers' llama); custom prefers none."""
    wanted = "llama" if preferred in ("llama2", "llama3") else preferred
    order = sorted(FAMILIES.values(), key=lambda f: f.model_type != wanted)
    for family in order:
        if family.misfit(dims) is None:
            return family
    reasons = "; ".join(f"{f.model_type}: {f.misfit(dims)}" for f in order)
    raise UserError(f"the model's switches fit no transformers architecture, so it cannot be exported ({reasons})")


def _rope_config(dims: ModelDims) -> dict[str, Any] | None:
    """transformers' rope_scaling dict for the model's scaling (None: plain RoPE)."""
    s = dims.rope_scaling
    if s.kind == "none":
        return None
    out: dict[str, Any] = {"rope_type": s.kind, "factor": s.factor}
    if s.kind == "llama3":
        out |= {"original_max_position_embeddings": s.original_max_positions, "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor}
    elif s.kind == "yarn":
        out |= {"original_max_position_embeddings": s.original_max_positions, "beta_fast": s.beta_fast,
                "beta_slow": s.beta_slow}
        if s.attention_factor:
            out["attention_factor"] = s.attention_factor
    return out


def hf_config(dims: ModelDims, preferred: str, identity: Identity, dtype: torch.dtype = torch.float32
              ) -> dict[str, Any]:
    """config.json of the architecture `family_for` picks; RoPE in both transformers 4's and 5's spelling."""
    family = family_for(dims, preferred)
    scaling = _rope_config(dims)
    return {
        "architectures": [family.architecture], "model_type": family.model_type, "vocab_size": dims.vocab_size,
        "hidden_size": dims.dim, "intermediate_size": dims.ffn_dim, "num_hidden_layers": dims.n_layers,
        "num_attention_heads": dims.n_heads, "num_key_value_heads": dims.n_kv_heads, "head_dim": dims.head_dim,
        family.activation_key: _HF_ACTIVATION[dims.activation], "max_position_embeddings": identity.max_positions,
        "rms_norm_eps": dims.norm_eps, "rope_theta": dims.rope_theta, "rope_scaling": scaling,
        "rope_parameters": {"rope_type": "default", **(scaling or {}), "rope_theta": dims.rope_theta},
        "attention_dropout": 0.0, **family.extra, **family.write(dims),
        "tie_word_embeddings": dims.tie_embeddings, "initializer_range": dims.init_std,
        "bos_token_id": identity.bos_id, "eos_token_id": identity.eos_id, "pad_token_id": identity.pad_id,
        "torch_dtype": str(dtype).removeprefix("torch."), "use_cache": True,
    }
