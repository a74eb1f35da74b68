"""The callback protocol and the MFU formula."""

from __future__ import annotations

import pytest

from parallel.callbacks import BaseCallback, Callback, LogCallback, StepStats, mfu
from parallel.model import ModelDims


def test_mfu_is_model_flops_over_peak() -> None:
    # 1000 tokens/s of a model doing 1e9 FLOPs per token on 2 devices of 1e12 FLOP/s each: 0.5
    assert mfu(1e9, 1000, num_devices=2, peak_flops=1e12) == pytest.approx(0.5)


def test_mfu_of_a_1b_llama_at_h100_speeds_is_plausible() -> None:
    dims = ModelDims(vocab_size=50304, dim=2048, n_layers=20, n_heads=16, n_kv_heads=8, ffn_dim=5632, norm_eps=1e-5,
                     rope_theta=5e5, tie_embeddings=False, init_std=0.02)
    assert 1.0e9 < dims.num_params() < 1.3e9
    assert 0.3 < mfu(dims.flops_per_token(2048), 50_000, 1, 989e12) < 0.5


def test_base_callback_satisfies_the_protocol_and_log_prints_on_cadence() -> None:
    lines: list[str] = []
    log = LogCallback(every=5, print_fn=lambda line, **_: lines.append(line))
    assert isinstance(BaseCallback(), Callback) and isinstance(log, Callback)
    for step in range(1, 11):
        log.on_step(StepStats(step=step, loss=2.0, lr=1e-3, grad_norm=0.5, tokens=100, step_seconds=0.1,
                              tokens_per_second=1000.0, mfu=0.25))
    assert [line.split("|")[0].split()[1] for line in lines] == ["1", "5", "10"]
    assert "mfu 0.250" in lines[0]
