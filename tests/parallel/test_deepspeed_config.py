"""The spec → DeepSpeed config mapping."""

from __future__ import annotations

from orchestrator.validate import parse_spec
from parallel.deepspeed_config import NO_CLIP, build_ds_config
from parallel.parallel_dims import ParallelDims


def config(*overrides: str, world: int = 4) -> dict:
    raw = {"model": {"vocab_size": 128}, "parallel": {"backend": "deepspeed"}, "resources": {"gpus_per_node": world}}
    spec = parse_spec(raw, overrides=overrides)
    return build_ds_config(spec, ParallelDims.from_spec(spec, world, 0))


def test_batch_sizes_multiply_over_data_parallel_ranks_only() -> None:
    c = config("parallel.tp=2", "parallel.micro_batch_size=3", "parallel.grad_accum=5")
    assert (c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"], c["train_batch_size"]) == (3, 5, 30)


def test_zero_stage_precision_and_offload() -> None:
    c = config("parallel.zero_stage=3", "parallel.offload_optimizer=true")
    assert c["zero_optimization"]["stage"] == 3
    assert c["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert c["bf16"]["enabled"] and c["data_types"] == {"grad_accum_dtype": "fp32"}
    assert c["zero_allow_untested_optimizer"] is True and "optimizer" not in c and "scheduler" not in c


def test_without_zero_bf16_accumulates_in_bf16_and_fp32_has_no_bf16() -> None:
    assert "data_types" not in config("parallel.zero_stage=0")
    assert config("parallel.precision=fp32")["bf16"] == {"enabled": False}


def test_clipping_off_still_computes_the_norm() -> None:
    assert config("optim.grad_clip=0")["gradient_clipping"] == NO_CLIP
    assert config("optim.grad_clip=0.7")["gradient_clipping"] == 0.7


def test_pipelining_sends_whole_activations() -> None:
    assert "pipeline" not in config()
    assert config("parallel.pp=2", "parallel.tp=2")["pipeline"]["pipe_partitioned"] is False


def test_bf16_never_reads_an_overflow_flag_and_zero1_accumulates_during_backward() -> None:
    assert config("parallel.zero_stage=3")["bf16"] == {"enabled": True, "check_grad_overflow": False,
                                                       "immediate_grad_update": False}
    assert config("parallel.zero_stage=1")["bf16"]["immediate_grad_update"] is True
    assert config("parallel.zero_stage=1", "parallel.pp=2")["bf16"]["immediate_grad_update"] is False
    assert config("parallel.zero_stage=1", "parallel.offload_optimizer=true")["bf16"]["immediate_grad_update"] is False


def test_buckets_never_exceed_the_model() -> None:
    small = config("model.dim=64", "model.n_layers=2", "model.n_heads=2")["zero_optimization"]
    assert small["reduce_bucket_size"] == small["allgather_bucket_size"] < 200_000
    big = config("model.dim=4096", "model.n_layers=32", "model.n_heads=32", "model.vocab_size=32000")
    assert big["zero_optimization"]["reduce_bucket_size"] == 200_000_000
