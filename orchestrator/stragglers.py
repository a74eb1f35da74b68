"""Find ranks slower than the rest: per-rank step time against the other ranks' median, times a factor.

One slow GPU (thermal throttling, a bad link, a noisy neighbour) sets the pace of the whole synchronous gang; it
shows as a rank whose own step time stands out from the median of the other ranks.
"""

from __future__ import annotations

from collections.abc import Mapping

from cluster.metrics import straggler_ratios


def find_stragglers(step_times: Mapping[int, float], factor: float) -> dict[int, float]:
    """rank → its step time / the others' median, for every rank slower than `factor` × that median."""
    times = {r: t for r, t in step_times.items() if t is not None and t > 0}
    if len(times) < 2:
        return {}
    return {r: ratio for r, ratio in sorted(straggler_ratios(times).items()) if ratio > factor}
