"""Expert parallelism (`parallel.ep`) trains as one process does, resumes exactly, and reshards to ep1.

Every run of a small MoE (4 experts, top-2, both balancing methods: the auxiliary loss per sequence and the
aux-free bias) is held to the single-process reference with the layout tests' tolerances (1e-5 relative on losses,
1e-5 absolute on parameters and the experts' bias). Two launches: two ranks run ep1 (dp2), ep2 (dp2, ZeRO-3) saving a
checkpoint after step 2, ep2 resumed from it (bit for bit) and ep1 resumed from it (DCP reshards the experts'
Shard(0) over ep into whole tensors); four ranks run ep4, dp4 with ep2, ep2×tp2 (sequence parallel), ep2×pp2 and
dp2×cp2 with ep2 over the cp ranks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchestrator.elastic import resize
from orchestrator.errors import SpecError
from orchestrator.validate import parse_spec
from parallel.consolidate import layout_spec
from parallel.expert_parallel import segment_order
from tests.helpers import hold_to_reference, run_layout
from tests.parallel.layout_worker import TINY

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("expert-parallel")]

MOE = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.balance=both", "model.moe.aux_loss_coef=0.01",
       "model.moe.bias_update_rate=0.01"]
STEPS = "schedule.steps=4"
SAVE_AT = 2
RUN = ["parallel.backend=native", *MOE, STEPS]
FOUR = {"ep4": [*RUN, "parallel.ep=4"],
        "dp4-ep2": [*RUN, "parallel.ep=2", "parallel.zero_stage=2"],
        "ep2-tp2": [*RUN, "parallel.ep=2", "parallel.tp=2", "parallel.sequence_parallel=true"],
        "ep2-pp2": [*RUN, "parallel.ep=2", "parallel.pp=2", "parallel.grad_accum=2"],
        "dp2-cp2-ep2": [*RUN, "parallel.cp=2", "parallel.ep=2"]}  # the ep group is the cp group


def test_tokens_from_each_rank_are_regrouped_by_local_expert() -> None:
    # received[j, e]: tokens rank j sent for local expert e, arriving rank by rank, each rank's grouped by expert.
    received = torch.tensor([[2, 0, 1], [1, 3, 0]])
    arrived = [("r0", 0)] * 2 + [("r0", 2)] + [("r1", 0)] + [("r1", 1)] * 3
    order = segment_order(received)
    assert [arrived[i][1] for i in order.tolist()] == [0, 0, 0, 1, 1, 1, 2]
    assert [arrived[i][0] for i in order.tolist()] == ["r0", "r0", "r1", "r1", "r1", "r1", "r0"]
    assert sorted(order.tolist()) == list(range(7))


@pytest.mark.parametrize("overrides,match", [
    (["parallel.ep=2"], r"parallel\.ep: 2 splits the experts of an MoE model, but model\.moe\.num_experts is 0"),
    ([*MOE, "parallel.ep=2", "parallel.backend=deepspeed"], r"parallel\.ep: 2 needs parallel\.backend=native"),
    (["model.moe.num_experts=6", "parallel.ep=4"], r"parallel\.ep: 4 does not divide model\.moe\.num_experts=6"),
    ([*MOE, "parallel.ep=4", "parallel.tp=2"], r"parallel\.ep: 4 does not divide dp × cp = 2"),
    ([*MOE, "parallel.ep=2", "parallel.cp=4"], r"parallel\.ep: 2 is not a multiple of parallel\.cp=4"),
    ([*MOE, "parallel.ep=2", "resources.num_nodes=2", "resources.gpus_per_node=3"],
     r"parallel\.ep: ep=2 × tp=1 ranks would straddle nodes"),
], ids=["dense", "deepspeed", "experts", "dp-cp", "cp", "nodes"])
def test_layouts_expert_parallelism_cannot_run_are_refused_naming_parallel_ep(overrides: list[str], match: str) -> None:
    with pytest.raises(SpecError, match=match):
        parse_spec(TINY, overrides=["resources.gpus_per_node=4", *overrides])
    parse_spec(TINY, overrides=["resources.gpus_per_node=4", *MOE, "parallel.backend=native", "parallel.ep=2"])


def test_consolidation_gathers_an_ep_checkpoint_without_ep(tmp_path: Path) -> None:
    """Consolidation reads a native checkpoint of any layout in one process: DCP reshards the experts (and the
    stages) on load."""
    step = tmp_path / "step_3"
    step.mkdir()
    layout = {"backend": "native", "dp": 1, "pp": 2, "tp": 1, "zero_stage": 1, "step": 3, "world_size": 4}
    (step / "layout.json").write_text(json.dumps(layout))
    spec = parse_spec(TINY, overrides=[*RUN, "parallel.cp=2", "parallel.ep=2", "resources.gpus_per_node=4"])
    gathered = layout_spec(spec, str(step))
    assert (gathered.parallel.ep, gathered.parallel.cp, gathered.world_size) == (1, 1, 1)


def test_an_elastic_resize_keeps_ep_only_where_dp_still_splits_over_it() -> None:
    spec = parse_spec(TINY, overrides=[*RUN, "parallel.ep=4", "parallel.micro_batch_size=1",
                                       "parallel.global_batch_size=8", "resources.num_nodes=4",
                                       "resources.gpus_per_node=2", "resources.min_nodes=1"])
    assert resize(spec, 2).parallel.dp == 4
    assert resize(spec, 1) is None


def _hold(name: str, got: dict, overrides: list[str], start: int = 0) -> None:
    hold_to_reference(name, got["losses"], got["params"], overrides, start)


def test_ep2_trains_as_ep1_and_one_process_resumes_exactly_and_reshards_to_ep1(tmp_path: Path) -> None:
    ckpt = str(tmp_path / "ckpt")
    cases = {"ep1": RUN,
             "ep2": {"overrides": [*RUN, "parallel.ep=2", "parallel.zero_stage=3"], "save": ckpt, "save_at": SAVE_AT},
             "ep2-resumed": {"overrides": [*RUN, "parallel.ep=2", "parallel.zero_stage=3"], "load": ckpt},
             "ep1-resumed": {"overrides": RUN, "load": ckpt}}
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    results = run_layout(2, ["--cases", str(tmp_path / "cases.json")], tmp_path / "result.pt", tmp_path)
    _hold("ep1", results["ep1"], RUN)
    straight = results["ep2"]
    _hold("ep2", straight, RUN)
    assert any(v.abs().max() > 0 for n, v in straight["params"].items() if n.endswith("expert_bias")), \
        "the aux-free bias moved"
    resumed = results["ep2-resumed"]
    assert resumed["losses"] == straight["losses"][SAVE_AT:]
    for name, value in straight["params"].items():
        assert torch.equal(resumed["params"][name], value), name
    _hold("ep1-resumed", results["ep1-resumed"], RUN, start=SAVE_AT)


def test_expert_parallel_layouts_of_four_ranks_match_one_process(tmp_path: Path) -> None:
    (tmp_path / "cases.json").write_text(json.dumps(FOUR))
    results = run_layout(4, ["--cases", str(tmp_path / "cases.json")], tmp_path / "result.pt", tmp_path)
    for name, overrides in FOUR.items():
        _hold(name, results[name], overrides)
        assert results[name]["eval_loss"] < results[name]["losses"][0] - 0.1, "eval sees the trained weights"
