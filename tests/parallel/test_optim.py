"""Learning-rate schedules and the weight-decay split."""

from __future__ import annotations

import pytest
import torch

from orchestrator.spec import OptimConfig, ScheduleConfig
from parallel.optim import build_optimizer, build_param_groups, build_scheduler, lr_at
from tests.helpers import tiny

OPTIM = OptimConfig(lr=1.0, min_lr=0.1)


def schedule(kind: str, **kw) -> ScheduleConfig:
    return ScheduleConfig(steps=100, warmup_steps=10, lr_schedule=kind, **kw)


@pytest.mark.parametrize("kind", ["cosine", "wsd", "constant"])
def test_warmup_is_linear_to_the_peak(kind: str) -> None:
    s = schedule(kind)
    assert [lr_at(i, OPTIM, s) for i in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])


def test_cosine_decays_to_min_lr() -> None:
    s = schedule("cosine")
    assert lr_at(10, OPTIM, s) == pytest.approx(1.0)
    assert lr_at(55, OPTIM, s) == pytest.approx(0.55)
    assert lr_at(100, OPTIM, s) == pytest.approx(0.1)


def test_wsd_holds_then_decays_linearly_over_the_last_fraction() -> None:
    s = schedule("wsd", decay_fraction=0.2)
    assert lr_at(79, OPTIM, s) == pytest.approx(1.0)
    assert lr_at(89, OPTIM, s) == pytest.approx(1.0 - 0.9 * 10 / 20)
    assert lr_at(99, OPTIM, s) == pytest.approx(0.1)


def test_constant_stays_at_the_peak() -> None:
    assert lr_at(99, OPTIM, schedule("constant")) == 1.0


def test_scheduler_steps_the_optimizer_through_lr_at() -> None:
    model = tiny()
    s = schedule("cosine")
    optimizer = build_optimizer(build_param_groups(model.named_parameters(), 0.1), OPTIM, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, OPTIM, s)
    seen = []
    for _ in range(30):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([lr_at(i, OPTIM, s) for i in range(30)])


def test_norms_and_embeddings_are_not_decayed() -> None:
    decay, no_decay = build_param_groups(tiny(tie=True).named_parameters(), 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"])
    assert sum(p.ndim == 1 for p in no_decay["params"]) == 5  # 2 per block + the final norm
    assert sum(p.ndim == 2 for p in no_decay["params"]) == 1  # the (tied) embedding
