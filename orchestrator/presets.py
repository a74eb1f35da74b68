"""Named model presets: `model: {family: qwen3, size: 1.7b}` stands for the published model's every value.

A family fills the switches its architecture is made of (activation, norm placement, biases, query/key norms, RoPE
base, sliding windows, soft-caps, embedding scale and tying, epsilon, context); a size fills the dimensions of that
family's published checkpoint, taken from its config.json on the Hugging Face Hub (and the Llama 3.x RoPE scaling,
which differs between 3.1 and 3.2).

A preset only fills what the spec leaves out: a key written in the spec, or set by a `model.x=...` override (merged
over the filled mapping afterwards), wins. It is applied to the raw mapping before the spec is parsed
(`orchestrator.validate.parse_spec`), so the resolved spec holds every value concretely and parsing it again, family
and size still named, fills nothing and gives the same model. `family: custom` fills nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from orchestrator.errors import Problem

CUSTOM = "custom"

# What every family sets unless it says otherwise: Llama's block.
_BASE: dict[str, Any] = {
    "activation": "silu", "norm_placement": "pre", "qkv_bias": False, "qk_norm": "none",
    "rope_scaling": {"type": "none"}, "sliding_window": 0, "full_attention_every": 0, "attn_softcap": 0.0,
    "logit_softcap": 0.0, "attn_scale_dim": None, "scale_embeddings": False, "tie_embeddings": False,
}

FAMILIES: dict[str, dict[str, Any]] = {
    "llama2": {**_BASE, "rope_theta": 10000.0, "norm_eps": 1e-5, "max_positions": 4096},
    "llama3": {**_BASE, "rope_theta": 500000.0, "norm_eps": 1e-5, "max_positions": 131072},
    "qwen2": {**_BASE, "qkv_bias": True, "rope_theta": 1000000.0, "norm_eps": 1e-6, "max_positions": 131072},
    "qwen3": {**_BASE, "qk_norm": "head", "rope_theta": 1000000.0, "norm_eps": 1e-6, "max_positions": 40960},
    "mistral": {**_BASE, "sliding_window": 4096, "rope_theta": 10000.0, "norm_eps": 1e-5, "max_positions": 32768},
    "olmo2": {**_BASE, "norm_placement": "post", "qk_norm": "full", "rope_theta": 500000.0, "norm_eps": 1e-6,
              "max_positions": 4096},
    "gemma2": {**_BASE, "activation": "gelu_tanh", "norm_placement": "sandwich", "sliding_window": 4096,
               "full_attention_every": 2, "attn_softcap": 50.0, "logit_softcap": 30.0, "scale_embeddings": True,
               "tie_embeddings": True, "rope_theta": 10000.0, "norm_eps": 1e-6, "max_positions": 8192},
}


def _dims(vocab: int, dim: int, layers: int, heads: int, kv: int, head_dim: int, ffn: int,
          **switches: Any) -> dict[str, Any]:
    return {"vocab_size": vocab, "dim": dim, "n_layers": layers, "n_heads": heads, "n_kv_heads": kv,
            "head_dim": head_dim, "ffn_dim": ffn, **switches}


# Llama 3.2 (1B, 3B: tied, RoPE stretched 32×) and Llama 3.1 (8B, 70B: 8×), all from an 8192-token original.
_LLAMA32_ROPE = {"type": "llama3", "factor": 32.0, "original_max_positions": 8192, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0}
_LLAMA31_ROPE = {**_LLAMA32_ROPE, "factor": 8.0}

# size → (vocab, dim, layers, heads, kv heads, head_dim, ffn) and the switches that differ by size.
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "llama2": {
        "7b": _dims(32000, 4096, 32, 32, 32, 128, 11008),
        "13b": _dims(32000, 5120, 40, 40, 40, 128, 13824),
    },
    "llama3": {
        "1b": _dims(128256, 2048, 16, 32, 8, 64, 8192, tie_embeddings=True, rope_scaling=_LLAMA32_ROPE),
        "3b": _dims(128256, 3072, 28, 24, 8, 128, 8192, tie_embeddings=True, rope_scaling=_LLAMA32_ROPE),
        "8b": _dims(128256, 4096, 32, 32, 8, 128, 14336, rope_scaling=_LLAMA31_ROPE),
        "70b": _dims(128256, 8192, 80, 64, 8, 128, 28672, rope_scaling=_LLAMA31_ROPE),
    },
    "qwen2": {
        "0.5b": _dims(151936, 896, 24, 14, 2, 64, 4864, tie_embeddings=True),
        "1.5b": _dims(151936, 1536, 28, 12, 2, 128, 8960, tie_embeddings=True),
        "7b": _dims(152064, 3584, 28, 28, 4, 128, 18944),
    },
    "qwen3": {
        "0.6b": _dims(151936, 1024, 28, 16, 8, 128, 3072, tie_embeddings=True),
        "1.7b": _dims(151936, 2048, 28, 16, 8, 128, 6144, tie_embeddings=True),
        "4b": _dims(151936, 2560, 36, 32, 8, 128, 9728, tie_embeddings=True),
        "8b": _dims(151936, 4096, 36, 32, 8, 128, 12288),
        "14b": _dims(151936, 5120, 40, 40, 8, 128, 17408),
        "32b": _dims(151936, 5120, 64, 64, 8, 128, 25600),
    },
    "mistral": {
        "7b": _dims(32000, 4096, 32, 32, 8, 128, 14336),
    },
    "olmo2": {
        "1b": _dims(100352, 2048, 16, 16, 16, 128, 8192),
        "7b": _dims(100352, 4096, 32, 32, 32, 128, 11008),
        "13b": _dims(100352, 5120, 40, 40, 40, 128, 13824),
    },
    "gemma2": {  # attention scores scaled by query_pre_attn_scalar: head_dim, but dim / n_heads for 27b
        "2b": _dims(256000, 2304, 26, 8, 4, 256, 9216, attn_scale_dim=256),
        "9b": _dims(256000, 3584, 42, 16, 8, 256, 14336, attn_scale_dim=256),
        "27b": _dims(256000, 4608, 46, 32, 16, 128, 36864, attn_scale_dim=144),
    },
}


def preset(family: str, size: str = "") -> dict[str, Any]:
    """The `model` values `family` (and `size`, if given) stand for; {} for `custom`. Raises KeyError for a family
    or size that has no preset (`preset_problems` says so readably)."""
    if family == CUSTOM:
        return {}
    values = copy.deepcopy(FAMILIES[family])
    if size:
        values.update(copy.deepcopy(SIZES[family][size.lower()]))
    return values


def apply_preset(raw: Any, overrides: Sequence[str] = ()) -> tuple[Any, list[Problem]]:
    """`raw` (a spec's plain data) with its model section filled from the preset it names, and the problems found
    in `model.family` / `model.size`. The family and size may come from the spec or from overrides (the last one
    wins, as when the overrides are merged). Anything that is not a mapping is returned as it is, for the parser
    to report."""
    model = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(model, dict):
        model = {} if isinstance(raw, dict) and "model" not in raw else None
    if model is None:
        return raw, []
    assigned = dict(_assignment(item) for item in overrides)  # the last of a key wins, as in the merge
    family = assigned.get("model.family", _text(model.get("family", CUSTOM)))
    size = assigned.get("model.size", _text(model.get("size", "")))
    problems = preset_problems(family, size)
    if problems or family not in FAMILIES or size is None:
        return raw, problems
    filled = dict(raw, model=_fill(model, preset(family, size), assigned))
    return filled, []


def preset_problems(family: str | None, size: str | None) -> list[Problem]:
    """What is wrong with a family / size pair; an unknown family, or a value that is not text, is left to the
    fields' own checks."""
    if family is None or not size:
        return []
    if family == CUSTOM:
        return [Problem("model.size", f"{size!r} names a published size, but model.family is custom; set "
                        f"model.family to one of {', '.join(FAMILIES)}, or remove model.size and give the "
                        "dimensions")]
    sizes = SIZES.get(family)
    if sizes is not None and size.lower() not in sizes:
        return [Problem("model.size", f"{size!r} is not a size of model.family={family}; allowed: "
                        f"{', '.join(sizes)}")]
    return []


def _assignment(override: str) -> tuple[str, str]:
    """(dotted key, value as text) of a `section.key=value` override."""
    key, _, value = override.partition("=")
    return key.strip(), value.strip().strip("'\"")


def _text(value: Any) -> str | None:
    """A family or size as the parser will read it (`size: 7` is the text '7'); None for what it will refuse."""
    if isinstance(value, str):
        return value
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _fill(given: dict, values: dict[str, Any], assigned: dict[str, str]) -> dict:
    """`given` with each key of `values` it does not set added; a nested section (rope_scaling) is filled key by
    key, unless the spec or an override (`assigned`) names another type than the preset's, whose parameters then
    do not belong to it."""
    out = dict(given)
    for key, value in values.items():
        mine = out.get(key, {})
        if not isinstance(value, dict):
            out.setdefault(key, value)
        elif isinstance(mine, dict):
            kind = assigned.get(f"model.{key}.type", mine.get("type", value.get("type")))
            out[key] = {**value, **mine} if kind == value.get("type") else mine
    return out
