"""Cost of the metrics exporters on the training loop's critical path, and of one scrape.

    python benchmarks/metrics_exporter.py

The loop calls `RankExporter.on_step` once per optimizer step on every rank; it only stores numbers (the HTTP
thread renders them when Prometheus scrapes), so it should cost microseconds against steps of hundreds of
milliseconds. Prints the mean cost of a hook call and of a scrape of rank 0's endpoint.
"""

from __future__ import annotations

import time
import urllib.request

from cluster.metrics import RankExporter
from parallel.callbacks import StepStats


def main(steps: int = 20000, scrapes: int = 200) -> None:
    exporter = RankExporter("bench", 0, node="n0", host="127.0.0.1", checkpoint_every=100)
    stats = StepStats(step=0, loss=2.0, lr=3e-4, grad_norm=1.0, tokens=1 << 20, step_seconds=0.4,
                      tokens_per_second=2.6e6, mfu=0.45, memory_peak_bytes=60 << 30, total_tokens=0, world_size=64)
    try:
        start = time.perf_counter()
        for step in range(1, steps + 1):
            stats.step, stats.total_tokens = step, step << 20
            exporter.on_step(stats)
        hook_us = (time.perf_counter() - start) / steps * 1e6
        url = f"http://{exporter.target}/metrics"
        start = time.perf_counter()
        for _ in range(scrapes):
            with urllib.request.urlopen(url, timeout=5) as response:
                size = len(response.read())
        scrape_ms = (time.perf_counter() - start) / scrapes * 1e3
    finally:
        exporter.close()
    print(f"on_step: {hook_us:.1f} µs per call ({steps} calls)")
    print(f"scrape of rank 0: {scrape_ms:.2f} ms, {size} bytes ({scrapes} scrapes)")


if __name__ == "__main__":
    main()
