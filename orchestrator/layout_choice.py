"""Fill a layout the spec left open with the planner's choice for the GPUs the gang actually got.

A spec that names none of parallel.dp / cp / pp / tp leaves the split to us: on GPUs, the planner
(`orchestrator.planner.layout.choose_layout`) picks dp × cp × pp × tp (cp only where nothing else fits), the ZeRO
stage, the micro-batch, activation checkpointing and loss slices for the devices' memory, keeping the global batch.
On CPU ranks there is nothing to plan for: the validator's dp = ranks / (pp·tp) stays.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from orchestrator.spec import JobSpec
from orchestrator.validate import parse_spec, spec_to_dict

LAYOUT_KEYS = ("dp", "cp", "pp", "tp")


def layout_is_open(raw: Mapping[str, Any], overrides: Iterable[str] = ()) -> bool:
    """True when neither the YAML nor an override sets parallel.dp, cp, pp or tp."""
    parallel = raw.get("parallel") or {}
    if any(key in parallel for key in LAYOUT_KEYS):
        return False
    return not any(item.split("=", 1)[0].strip() in {f"parallel.{k}" for k in LAYOUT_KEYS} for item in overrides)


def apply_planner(spec: JobSpec, gpu_mem_bytes: int) -> tuple[JobSpec, list[str]]:
    """`spec` with the planner's layout for its ranks on GPUs of `gpu_mem_bytes`, and the planner's reasons."""
    from orchestrator.planner.layout import choose_layout

    plan = choose_layout(spec, spec.world_size, gpu_mem_bytes, spec.resources.gpus_per_node)
    raw = spec_to_dict(spec)
    chosen = plan.parallel
    for key in (*LAYOUT_KEYS, "zero_stage", "micro_batch_size", "grad_accum", "global_batch_size",
                "sequence_parallel", "activation_checkpointing", "loss_chunks"):
        raw["parallel"][key] = getattr(chosen, key)
    return parse_spec(raw, source=f"{spec.name} (planned layout)"), plan.explanation
