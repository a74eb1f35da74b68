"""The mixture: how many training tokens each source contributes, as a number of passes over its documents.

Shares come from the config where given; the rest of the mass goes to the other sources in proportion to
tokens^(1/T) (T = 1: natural proportions; large T: uniform). A target larger than `max_epochs` passes over a source
is capped and the shortfall is given to the sources that still have room (water-filling), so the realised shares
are as close to the targets as the data allows, and the report shows both.
"""

from __future__ import annotations

from dataclasses import dataclass

from dataprep.config import MixConfig, SourceConfig
from dataprep.stages import PrepRun, Stage, StageOutput


@dataclass(frozen=True)
class SourcePlan:
    tokens: int  # training tokens available (one pass)
    target_share: float
    epochs: float  # passes to emit: whole passes plus a sampled fraction
    planned_tokens: float

    @property
    def whole_epochs(self) -> int:
        return int(self.epochs)


class MixStage(Stage):
    """The mixture plan per source (`info`), from the training tokens that encoding found in each."""

    name = "mix"

    def run(self, prep: PrepRun) -> StageOutput:
        tokens = {name: 0 for name in self.config.sources}
        for stat in prep["encode"].results.values():
            tokens[stat["source"]] += stat["train_tokens"] + stat["train_docs"]  # + one EOS per document
        return StageOutput(info=plan_mixture(tokens, self.config.sources, self.config.mix))


def plan_mixture(tokens: dict[str, int], sources: dict[str, SourceConfig], config: MixConfig) -> dict[str, SourcePlan]:
    names = [n for n in tokens if tokens[n] > 0]
    shares = target_shares({n: tokens[n] for n in names}, {n: sources[n].share for n in names}, config.temperature)
    total = config.total_tokens or sum(tokens[n] for n in names)
    planned = _water_fill({n: shares[n] * total for n in names}, {n: config.max_epochs * tokens[n] for n in names})
    plans = {n: SourcePlan(tokens[n], shares.get(n, 0.0), planned.get(n, 0.0) / tokens[n] if tokens[n] else 0.0,
                           planned.get(n, 0.0)) for n in names}
    for n in tokens:
        plans.setdefault(n, SourcePlan(0, 0.0, 0.0, 0.0))
    return plans


def target_shares(tokens: dict[str, int], given: dict[str, float], temperature: float) -> dict[str, float]:
    fixed = {n: s for n, s in given.items() if s > 0}
    free = [n for n in tokens if n not in fixed]
    rest = max(0.0, 1.0 - sum(fixed.values()))
    weights = {n: tokens[n] ** (1.0 / temperature) for n in free}
    norm = sum(weights.values())
    shares = dict(fixed)
    shares.update({n: rest * w / norm for n, w in weights.items()} if norm else {})
    scale = sum(shares.values())
    return {n: s / scale for n, s in shares.items()} if scale else shares


def _water_fill(targets: dict[str, float], caps: dict[str, float]) -> dict[str, float]:
    """Give each source its target, cap it, and hand the excess to uncapped sources in proportion to targets."""
    result = {n: 0.0 for n in targets}
    open_ = {n for n in targets if caps[n] > 0}
    remaining = sum(targets.values())
    while open_ and remaining > 1e-9:
        weight = sum(targets[n] for n in open_)
        if weight <= 0:
            break
        spill = 0.0
        for n in sorted(open_):
            want = remaining * targets[n] / weight
            give = min(want, caps[n] - result[n])
            result[n] += give
            spill += want - give
        open_ = {n for n in open_ if caps[n] - result[n] > 1e-9}
        remaining = spill
    return result
