"""MFU is shown and exported only where the device's peak FLOP/s is known: on an accelerator, not on a CPU."""

from __future__ import annotations

import re
import urllib.request

import pytest

from cluster.metrics import RankExporter
from parallel.callbacks import LogCallback, StepStats, device_peak_flops


def stats(mfu: float | None) -> StepStats:
    return StepStats(step=1, loss=2.5, lr=1e-3, grad_norm=0.7, tokens=4096, step_seconds=0.5,
                     tokens_per_second=8192.0, mfu=mfu, rank=0, world_size=2)


def test_a_cpu_has_no_peak_and_an_accelerator_the_configured_one():
    assert device_peak_flops("cpu", 989e12) is None
    assert device_peak_flops("cuda", 989e12) == 989e12


@pytest.mark.parametrize("mfu", [None, 0.42])
def test_the_log_line_and_the_exporter_carry_mfu_only_when_known(mfu):
    lines: list[str] = []
    LogCallback(1, print_fn=lambda line, flush: lines.append(line)).on_step(stats(mfu))
    exporter = RankExporter("r", 0, host="127.0.0.1")
    try:
        exporter.on_step(stats(mfu))
        with urllib.request.urlopen(f"http://{exporter.target}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        exporter.close()
    exported = re.findall(r"^pretrain_mfu_ratio\{.*\} (\S+)$", text, re.MULTILINE)
    assert "pretrain_loss{" in text
    if mfu is None:
        assert "mfu" not in lines[0] and exported == []
    else:
        assert "| mfu 0.420 |" in lines[0] and [float(v) for v in exported] == [mfu]
