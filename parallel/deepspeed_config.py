"""The job spec → DeepSpeed config mapping, in one place.

The optimizer and LR schedule are not in it: they are built by `parallel.optim` and handed to DeepSpeed as client
objects, so every backend steps the same AdamW with the same schedule. What DeepSpeed 0.19.8 allows and what the
validator enforces: ZeRO 2/3 are refused with pipeline parallelism; fp16 is not offered (bf16 or fp32).
"""

from __future__ import annotations

from typing import Any

from orchestrator.spec import JobSpec
from parallel.model import ModelDims
from parallel.parallel_dims import ParallelDims

# Bucket sizes in elements: large enough to keep NCCL busy, small enough to overlap with the backward pass; never
# larger than the model, whose buckets DeepSpeed allocates in full (a small model would hold GBs of empty buffer).
BUCKET = 200_000_000
NO_CLIP = 1e30


def build_ds_config(spec: JobSpec, dims: ParallelDims) -> dict[str, Any]:
    p = spec.parallel
    bucket = min(BUCKET, ModelDims.from_config(spec.model).num_params())
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.zero_stage >= 1:
        zero.update(
            overlap_comm=True, contiguous_gradients=True, reduce_bucket_size=bucket,
            allgather_bucket_size=bucket, reduce_scatter=True,
        )
    if p.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=bucket // 4, stage3_param_persistence_threshold=100_000,
                    stage3_gather_16bit_weights_on_model_save=False)
    if p.offload_optimizer and p.zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": p.micro_batch_size,
        "gradient_accumulation_steps": p.grad_accum,
        "train_batch_size": p.micro_batch_size * p.grad_accum * dims.dp,
        # No clipping is a threshold never reached, so DeepSpeed still computes the norm we report.
        "gradient_clipping": spec.optim.grad_clip or NO_CLIP,
        "zero_optimization": zero,
        # The client torch AdamW (fused on CUDA) is what ZeRO wraps; DeepSpeed only vouches for its own by default.
        "zero_allow_untested_optimizer": True,
        "bf16": _bf16(spec, dims),
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
    if p.precision == "bf16" and p.zero_stage >= 1:
        # Accumulate gradients over micro-batches in fp32: bf16 sums lose low bits with grad_accum > 1. DeepSpeed
        # offers it only with ZeRO (stage 1 through its BF16_Optimizer); without ZeRO it refuses the mix.
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if dims.pp > 1:
        config["pipeline"] = {"activation_checkpoint_interval": 0, "pipe_partitioned": False,
                              "grad_partitioned": False}
    return config


def _bf16(spec: JobSpec, dims: ParallelDims) -> dict[str, Any]:
    """bf16 without DeepSpeed's per-step overflow check: bf16 has fp32's range, so there is no loss scale to adjust,
    and the check reads a flag back to the host every step, stalling the GPU queue. A non-finite loss shows in the
    logged loss, as on the native backend. Under ZeRO-1 gradients go into the fp32 accumulator as each one is ready
    (during the backward pass, freeing the bf16 copy) instead of in a loop after it; the pipeline engine reduces tied
    weights' bf16 gradients after the backward pass, so it keeps the loop."""
    p = spec.parallel
    if p.precision != "bf16":
        return {"enabled": False}
    return {"enabled": True, "check_grad_overflow": False,
            "immediate_grad_update": p.zero_stage == 1 and dims.pp == 1 and not p.offload_optimizer}
