"""Checkpoints in Hugging Face's format: `config.json`, `model.safetensors` (or shards and an index), tokenizer.

    weights = open_hf_weights("Qwen3-0.6B/", dims)   # validated, lazy: engine.load_full_state_dict(weights)
    save_hf("out/", engine.full_state_dict(), dims, HFExport(dtype=torch.bfloat16, family="qwen3", ...))

Our parameter names are the families' own without `model.` and RoPE uses their rotate-half layout, so conversion is
a rename (and Gemma's norms shifted by one; a mixture of experts' per-expert tensors stacked into the model's 3-D
expert parameters); which architectures and switches map to which is `parallel.hf_families`'. What needs care is
refusing what the model cannot represent rather than loading it into the wrong computation, and naming the tensor
whose shape is off. Reading is lazy (safetensors are memory-mapped and
read one tensor at a time), so every rank of a large layout takes its slices from the files without holding a
second full copy. What a model is beyond its weights (its tokenizer, chat template, special tokens, context)
travels with a run through `parallel.hf_origin`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from orchestrator.config_parser import load_json, show
from orchestrator.errors import UserError
from parallel.checkpoint_layout import holds_checkpoints
from parallel.hf_families import Family, Identity, dims_from_hf_config, family_for, family_of, hf_config, identity_of
from parallel.model import ModelDims, Transformer, build_model
from parallel.mup import to_standard

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
GENERATION_CONFIG = "generation_config.json"
DEFAULT_SHARD_BYTES = 5 * 2**30  # transformers' own default for save_pretrained
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Buffers some exporters write beside the weights; recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
ROUTING_BIAS = "mlp.expert_bias"  # the buffer of auxiliary-loss-free balancing (`parallel.moe`)
_MOST = 2**24


def to_hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else f"model.{name}"


def is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


# ---------------------------------------------------------------------------------------------- config


def _count(v: Any) -> bool:
    return type(v) is int and 1 <= v <= _MOST


def _number(v: Any) -> bool:
    return type(v) in (int, float)


def _token_ids(v: Any) -> bool:
    ids = v if isinstance(v, list) else [v]
    return all(type(i) is int and 0 <= i < _MOST for i in ids)


_ROPE_NUMBERS = ("rope_theta", "factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow",
                 "attention_factor", "mscale", "mscale_all_dim", "partial_rotary_factor")
_CHECKS: list[tuple[tuple[str, ...], str, Any]] = [
    (("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
      "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window", "query_pre_attn_scalar",
      *(f"{r}.original_max_position_embeddings" for r in ("rope_parameters", "rope_scaling")),
      "num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step"),
     f"an integer from 1 to {_MOST}", _count),
    (("rms_norm_eps", "rope_theta", "initializer_range", "attn_logit_softcapping", "final_logit_softcapping",
      "partial_rotary_factor", "router_aux_loss_coef", "router_jitter_noise",
      *(f"{r}.{k}" for r in ("rope_parameters", "rope_scaling") for k in _ROPE_NUMBERS)),
     "a number", _number),
    (("rope_parameters", "rope_scaling"), "an object", lambda v: isinstance(v, dict)),
    (("model_type", "hidden_act", "hidden_activation", "rope_parameters.rope_type", "rope_scaling.rope_type",
      "rope_scaling.type"), "a string", lambda v: isinstance(v, str)),
    (("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window", "norm_topk_prob"), "true or false",
     lambda v: isinstance(v, bool)),
    (("mlp_only_layers",), "a list of layer indices",
     lambda v: isinstance(v, list) and all(type(i) is int and 0 <= i < _MOST for i in v)),
    (("layer_types",), "a list of strings", lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v)),
    (("bos_token_id", "eos_token_id", "pad_token_id"), f"a token id (0 to {_MOST - 1}) or a list of them",
     _token_ids),
]


def read_hf_config(directory: str) -> dict[str, Any]:
    """config.json of a Hugging Face model directory; a missing directory or file, JSON that is bad or hostile
    (not UTF-8, oversized, too deep, NaN, huge integers), or a setting the model reads holding the wrong type or
    an impossible size, is a UserError."""
    if not os.path.isdir(directory):
        raise UserError(f"{directory}: no such directory (expected a Hugging Face model directory with {CONFIG})")
    path = os.path.join(directory, CONFIG)
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing; a Hugging Face model directory holds {CONFIG} and {WEIGHTS}")
    config = load_json(path, error=UserError)
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(config).__name__}")
    values = dict(config)
    for section in ("rope_parameters", "rope_scaling"):
        if isinstance(config.get(section), dict):
            values |= {f"{section}.{k}": v for k, v in config[section].items()}
    problems = [f"{key}={show(values[key])}: expected {kind}" for keys, kind, fits in _CHECKS for key in keys
                if values.get(key) is not None and not fits(values[key])]
    if problems:
        raise UserError(f"{path}: " + "; ".join(problems))
    return config


def model_settings(dims: ModelDims) -> dict[str, Any]:
    """The job spec's `model.*` values that build these dims (rope_scaling's as `rope_scaling.<key>`), each
    resolved: two dims that compute the same give the same settings."""
    r = dims.rope_scaling if dims.rope_scaling.kind != "none" else type(dims.rope_scaling)()
    return {"vocab_size": dims.vocab_size, "dim": dims.dim, "n_layers": dims.n_layers, "n_heads": dims.n_heads,
            "n_kv_heads": dims.n_kv_heads, "head_dim": dims.head_dim, "ffn_dim": dims.ffn_dim,
            "activation": dims.activation, "norm_eps": dims.norm_eps, "norm_placement": dims.norm_placement,
            "qkv_bias": dims.qkv_bias, "qk_norm": dims.qk_norm, "rope_theta": dims.rope_theta,
            "rope_scaling.type": r.kind, "rope_scaling.factor": r.factor,
            "rope_scaling.original_max_positions": r.original_max_positions,
            "rope_scaling.low_freq_factor": r.low_freq_factor, "rope_scaling.high_freq_factor": r.high_freq_factor,
            "rope_scaling.beta_fast": r.beta_fast, "rope_scaling.beta_slow": r.beta_slow,
            "rope_scaling.attention_factor": r.attention_factor, "sliding_window": dims.sliding_window,
            "full_attention_every": dims.full_attention_every if dims.sliding_window else 0,
            "attn_softcap": dims.attn_softcap, "logit_softcap": dims.logit_softcap,
            "attn_scale_dim": dims.attn_scale_dim or dims.head_dim, "scale_embeddings": dims.scale_embeddings,
            "tie_embeddings": dims.tie_embeddings, **moe_settings(dims)}


def moe_settings(dims: ModelDims) -> dict[str, Any]:
    """The `model.moe.*` values that route and size the experts as `dims` do (none for a dense model): the
    computation's, not the training's (balancing, capacity)."""
    m = dims.moe
    if m is None:
        return {}
    return {"moe.num_experts": m.num_experts, "moe.top_k": m.top_k, "moe.num_shared_experts": m.num_shared_experts,
            "moe.every_n_layers": m.every_n_layers, "moe.first_dense_layers": m.first_dense_layers,
            "moe.expert_ffn_dim": m.ffn_dim, "moe.score": m.score, "moe.norm_topk": m.norm_topk}


def is_rope_setting(key: str) -> bool:
    """RoPE's base frequency and scaling say how positions are read, not what the weights hold: a run may set them
    apart from the model it starts from, which is how a context is extended (a model pretrained at 4k trained on at
    32k under a larger rope_theta or a RoPE scaling, as Llama 3 and Qwen 2.5 extend theirs)."""
    return key == "rope_theta" or key.startswith("rope_scaling.")


def rope_changes(found: ModelDims, run: ModelDims) -> list[str]:
    """The RoPE settings of `run` that differ from those of the model `found` it starts from, each as
    `model.<key>: <the model's> → <the run's>`."""
    have, want = model_settings(found), model_settings(run)
    return [f"model.{k}: {have[k]!r} → {want[k]!r}" for k in want if is_rope_setting(k) and have[k] != want[k]]


def check_same_dims(found: ModelDims, expected: ModelDims, source: str) -> None:
    """A Hugging Face model can initialise a run only if its shape is the run's: name every `model.*` that differs,
    RoPE's settings apart (`is_rope_setting`)."""
    dense = {"moe.num_experts": 0}
    have, want = dense | model_settings(found), dense | model_settings(expected)
    changed = [f"model.{k}: {want.get(k)!r} in the job spec, {have.get(k)!r} in {CONFIG}"
               for k in {**want, **have} if have.get(k) != want.get(k) and not is_rope_setting(k)]
    if changed:
        raise UserError(f"{source}: the model differs from the run's: " + "; ".join(changed)
                        + " (`pretrain import` writes a spec with the model's values)")


# ---------------------------------------------------------------------------------------------- weights


def expected_shapes(dims: ModelDims) -> dict[str, tuple[int, ...]]:
    """Every parameter of the full model under our names (a tied lm_head is the embedding's, so not listed)."""
    return {n: tuple(p.shape) for n, p in build_model(dims, "meta").named_parameters()}


class HFWeights(Mapping[str, torch.Tensor]):
    """A Hugging Face model's weights under our names and in our norm convention, read from the safetensors files
    when asked for (a 3-D expert parameter stacked from its experts' tensors)."""

    def __init__(self, dims: ModelDims, family: Family, sources: dict[str, list[tuple[str, str]]]):
        self.dims = dims  # the model they make, from config.json
        self.family = family
        self._sources = sources  # our name → (file, name in the file) of the whole tensor, or of each expert's

    def __getitem__(self, name: str) -> torch.Tensor:
        parts = []
        for path, stored in self._sources[name]:
            with safe_open(path, framework="pt") as f:
                parts.append(f.get_tensor(stored))
        tensor = parts[0] if len(self.family.stored_names(name, self.dims)) == 1 else torch.stack(parts)
        return self.family.model_norm(tensor) if is_norm(name) else tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


def weight_files(directory: str) -> list[str]:
    index = os.path.join(directory, INDEX)
    if os.path.isfile(index):
        document = load_json(index, error=UserError)
        weight_map = document.get("weight_map") if isinstance(document, dict) else None
        if not isinstance(weight_map, dict) or not all(
                isinstance(n, str) and n == os.path.basename(n) and n not in ("", ".", "..")
                for n in weight_map.values()):
            raise UserError(f"{index}: not a safetensors index: it needs \"weight_map\": {{tensor name: file name "
                            "in the same directory}}")
        return [os.path.join(directory, n) for n in sorted(set(weight_map.values()))]
    single = os.path.join(directory, WEIGHTS)
    if os.path.isfile(single):
        return [single]
    others = sorted(n for n in os.listdir(directory) if n.endswith((".bin", ".pt", ".pth")))
    hint = f" ({', '.join(others)} found: convert them to safetensors first)" if others else ""
    raise UserError(f"{directory}: no {WEIGHTS} or {INDEX}{hint}")


def open_hf_weights(directory: str, dims: ModelDims | None = None) -> HFWeights:
    """The weights of a Hugging Face directory, checked against its config (and `dims`, the run's model, when given).

    Every parameter must be present with its exact shape; a tensor the model has no place for (an o_proj bias,
    another architecture's layer) is refused rather than dropped.
    """
    config = read_hf_config(directory)
    source = os.path.join(directory, CONFIG)
    found = dims_from_hf_config(config, source)
    family = family_of(config, source)
    if dims is not None:
        check_same_dims(found, dims, directory)
    wanted = expected_shapes(found)
    found_at: dict[str, str] = {}  # stored name → file
    for path in weight_files(directory):
        if not os.path.isfile(path):
            raise UserError(f"{path}: missing, listed in {INDEX}")
        try:
            with safe_open(path, framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
        except Exception as e:  # noqa: BLE001 - safetensors raises its own untyped errors for a damaged file
            raise UserError(f"{path}: not a readable safetensors file: {e}") from None
        for hf_name, shape in shapes.items():
            name, expert = family.our_name(hf_name)
            if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and found.tie_embeddings):
                continue
            need = wanted.get(name)
            if need is not None and expert is not None:
                need = need[1:] if expert < need[0] else None
            if need is None:
                raise UserError(f"{path}: tensor {hf_name} {list(shape)} has no place in the {family.model_type} "
                                f"model {CONFIG} describes (unsupported architecture or layer)")
            if shape != need:
                raise UserError(f"{path}: tensor {hf_name} has shape {list(shape)}, the config ({CONFIG}) "
                                f"needs {list(need)}")
            found_at[hf_name] = path
    stored = {name: family.stored_names(name, found) for name in wanted}
    missing = [n for names in stored.values() for n in names if n not in found_at]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(f"{directory}: tensor {', '.join(missing[:3])}{more} missing from the weights")
    return HFWeights(found, family, {name: [(found_at[n], n) for n in names] for name, names in stored.items()})


def open_init_weights(path: str, dims: ModelDims) -> HFWeights:
    """The weights `checkpoint.init_from` names, for a run whose model is `dims`."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, CONFIG)) and holds_checkpoints(os.listdir(path)):
        raise UserError(f"checkpoint.init_from: {path} is a pretrain checkpoint; export it with `pretrain export "
                        f"{path} DIR` and set checkpoint.init_from=DIR (or set checkpoint.dir to resume it)")
    try:
        return open_hf_weights(path, dims)
    except UserError as e:
        raise UserError(f"checkpoint.init_from: {e}") from None


def load_hf_model(directory: str, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> Transformer:
    """A whole model from a Hugging Face directory, in one process (generation, tests)."""
    weights = open_hf_weights(directory)
    model = build_model(weights.dims, device).to(dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(weights[name])
    return model.eval()


# ---------------------------------------------------------------------------------------------- writing

# What a model directory holds beside its weights that makes it that model: kept from an imported model.
IDENTITY_FILES = (CONFIG, GENERATION_CONFIG, TOKENIZER, "tokenizer_config.json", "special_tokens_map.json",
                  "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt",
                  "added_tokens.json")


@dataclass
class TokenizerFiles:
    """The shards' tokenizer, to travel with an exported model."""

    tokenizer_json: str
    eos_id: int | None = None


@dataclass
class HFExport:
    """How to write a model: the weights' dtype, the largest safetensors file, the context, the architecture
    preferred (a spec's model.family), and whose tokenizer and special tokens: those of `origin` (a directory of
    an imported model's IDENTITY_FILES) when given, else the shards' `tokenizer`."""

    dtype: torch.dtype = torch.float32
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    max_positions: int = 2048
    family: str = "custom"
    tokenizer: TokenizerFiles | None = None
    origin: str | None = None

    def identity(self) -> Identity:
        if self.origin is not None:
            kept = identity_of(read_hf_config(self.origin))
            return Identity(self.max_positions, kept.bos_id, kept.eos_id, kept.pad_id)
        return Identity(self.max_positions, eos_id=self.tokenizer.eos_id if self.tokenizer else None)


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise UserError(f"--dtype: {name!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def save_hf(directory: str, state: Mapping[str, torch.Tensor], dims: ModelDims, how: HFExport) -> list[str]:
    """Write a Hugging Face model directory from a full state dict under our names; returns the files written.

    The architecture is `family_for(dims, how.family)`'s. Weights go into files of at most `max_shard_bytes` (one
    tensor larger than that gets a file of its own), with `model.safetensors.index.json` naming each tensor's file
    when there is more than one, as transformers expects. A μP model is written as the standard model computing the
    same logits (`parallel.mup.to_standard`).
    """
    state, dims = to_standard(state, dims)
    family = family_for(dims, how.family)
    config = hf_config(dims, how.family, how.identity(), how.dtype)
    wanted = expected_shapes(dims)
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise UserError(f"the model state lacks {', '.join(missing[:3])}: not a whole {dims.n_layers}-layer model")
    for name, shape in wanted.items():
        if tuple(state[name].shape) != shape:
            raise UserError(f"tensor {name} has shape {list(state[name].shape)}, the model needs {list(shape)}")
    check_no_routing_bias(state, family)
    os.makedirs(directory, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in wanted:
        whole = state[name].detach()
        whole = family.stored_norm(whole) if is_norm(name) else whole
        stored = family.stored_names(name, dims)
        for i, stored_name in enumerate(stored):
            tensor = (whole[i] if len(stored) > 1 else whole).to("cpu", how.dtype).contiguous()
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and size + nbytes > how.max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][stored_name] = tensor
            size += nbytes
    names = [WEIGHTS] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
    written = list(names)
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: n for n, s in zip(names, shards, strict=True) for k in s}}
        _write_json(os.path.join(directory, INDEX), index)
        written.append(INDEX)
    _write_json(os.path.join(directory, CONFIG), config)
    return [*written, CONFIG, *_write_identity(directory, how, config)]


def check_no_routing_bias(state: Mapping[str, torch.Tensor], family: Family) -> None:
    """Auxiliary-loss-free balancing (DeepSeek-V3) adds a learned bias to the router's scores to choose the experts;
    Qwen3-MoE's and Mixtral's routers have no such bias, so a model whose bias moved would route differently there."""
    for name, bias in state.items():
        if name.endswith(ROUTING_BIAS) and bool(bias.detach().ne(0).any()):
            raise UserError(f"tensor {name}: the model routes with a learned expert bias (model.moe.balance="
                            f"aux_free or both), which {family.architecture} has no place for, so the exported model "
                            "would choose other experts; train runs meant for transformers with "
                            "model.moe.balance=aux_loss")


def _write_identity(directory: str, how: HFExport, config: dict[str, Any]) -> list[str]:
    """The origin's tokenizer files and generation config as they were; what it lacks from the shards' tokenizer
    and the config's special tokens."""
    written = []
    for name in IDENTITY_FILES[1:]:
        if how.origin is not None and os.path.isfile(os.path.join(how.origin, name)):
            shutil.copyfile(os.path.join(how.origin, name), os.path.join(directory, name))
            written.append(name)
    if GENERATION_CONFIG not in written:
        _write_json(os.path.join(directory, GENERATION_CONFIG),
                    {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
        written.append(GENERATION_CONFIG)
    if TOKENIZER not in written and how.tokenizer is not None:
        written += write_tokenizer(directory, how.tokenizer, how.max_positions)
    return written


def shard_tokenizer(data_path: str) -> TokenizerFiles | None:
    """The tokenizer a shard directory (a local path or an object-store URI) was written with, or None when the
    shards (or their tokenizer) are gone. One in an object store is copied to the local temporary directory, under a
    name of its URI and content, since the tokenizers library reads local files only."""
    from dataprep import filesystem
    from dataprep.shards import MANIFEST_FILE, read_manifest

    if not data_path or not filesystem.is_file(filesystem.join(data_path, MANIFEST_FILE)):
        return None
    entry = read_manifest(data_path).get("tokenizer", {})
    path = filesystem.join(data_path, entry.get("file", TOKENIZER))
    if not filesystem.is_file(path):
        return None
    if filesystem.is_remote(path):
        data = filesystem.read_bytes(path)
        digest = hashlib.sha256(path.encode() + data).hexdigest()[:16]
        local = os.path.join(tempfile.gettempdir(), f"pretrain-tokenizer-{digest}.json")
        filesystem.write_atomic(local, data)
        path = local
    return TokenizerFiles(path, entry.get("eos_id"))


def write_tokenizer(directory: str, tokenizer: TokenizerFiles, max_positions: int) -> list[str]:
    """tokenizer.json as is, and a tokenizer_config.json that lets AutoTokenizer load it as a fast tokenizer."""
    from tokenizers import Tokenizer

    shutil.copyfile(tokenizer.tokenizer_json, os.path.join(directory, TOKENIZER))
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_positions,
                              "clean_up_tokenization_spaces": False}
    if tokenizer.eos_id is not None:
        config["eos_token"] = Tokenizer.from_file(tokenizer.tokenizer_json).id_to_token(tokenizer.eos_id)
    _write_json(os.path.join(directory, "tokenizer_config.json"), config)
    return [TOKENIZER, "tokenizer_config.json"]


def _write_json(path: str, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
