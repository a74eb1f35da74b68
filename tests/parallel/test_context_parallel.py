"""Context parallelism (`parallel.cp`) trains as one process does, resumes exactly, and reshards to cp1.

Every run is held to the single-process reference with the layout tests' tolerances (1e-5 relative on losses, 1e-5
absolute on parameters). The four-rank layouts, 4 steps each, share one torchrun launch (`layout_worker.py --cases`):
cp4, dp2×cp2, cp2×tp2 (sequence parallel), cp2×pp2, and dp2×cp2 of a Gemma 2-like model (sliding windows shorter than a
chunk's keys, soft-capped scores and logits, its own attention scale), whose attention takes the explicit-mask path, and
that model under cp2×pp2 with per-document masks and RoPE positions (the rows' chunks dealt to the ranks by their
attention work, a rank's mask built from the whole rows' document ids); test_documents holds cp2's logits of each
document to its own, independent of the others. Plain cp2 is the resume test's run (`native_resume_worker.py`): it
trains 7 steps, saving after step 5, and is held to the reference; loaded under cp2 it continues bit for bit, loaded
under cp1 (one process: DCP reshards the FSDP shards over dp × cp into whole tensors) within the tolerances.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from native_resume_worker import SAVE_AT
from test_native_checkpoint import run as run_resume

from parallel.documents import head_tail_positions
from tests.helpers import PARAM_ATOL, RTOL, hold_to_reference, run_layout

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("context-parallel")]

STEPS = "schedule.steps=7"  # the resume test saves after step 5
RUN = ["parallel.backend=native", "schedule.steps=4"]
GEMMA = ["model.norm_placement=sandwich", "model.activation=gelu_tanh", "model.attn_softcap=20",
         "model.logit_softcap=10", "model.sliding_window=6", "model.full_attention_every=2",
         "model.attn_scale_dim=24", "model.head_dim=32"]
FOUR = {"cp4": [*RUN, "parallel.cp=4", "parallel.activation_checkpointing=selective"],
        "dp2-cp2": [*RUN, "parallel.cp=2", "parallel.zero_stage=2"],
        "cp2-tp2": [*RUN, "parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true",
                    "parallel.loss_chunks=2"],
        "cp2-pp2": [*RUN, "parallel.cp=2", "parallel.pp=2", "parallel.grad_accum=2", "parallel.loss_chunks=2"],
        "dp2-cp2-gemma": [*RUN, "parallel.cp=2", "parallel.zero_stage=3", "parallel.activation_checkpointing=full",
                          "parallel.loss_chunks=2", *GEMMA],
        "cp2-pp2-gemma-documents": [*RUN, "parallel.cp=2", "parallel.pp=2", "parallel.grad_accum=2", *GEMMA,
                                    "model.attention_mask=document", "model.rope_positions=document"]}


def test_a_rank_holds_a_head_and_a_tail_chunk_at_their_true_positions() -> None:
    parts = head_tail_positions(16, 4)
    assert parts[0].tolist() == [0, 1, 14, 15]
    assert parts[3].tolist() == [6, 7, 8, 9]
    assert sorted(parts.flatten().tolist()) == list(range(16))


def test_context_parallel_layouts_of_four_ranks_match_one_process(tmp_path: Path) -> None:
    (tmp_path / "cases.json").write_text(json.dumps(FOUR))
    results = run_layout(4, ["--cases", str(tmp_path / "cases.json")], tmp_path / "result.pt", tmp_path)
    for name, overrides in FOUR.items():
        got = results[name]
        hold_to_reference(name, got["losses"], got["params"], overrides)
        assert got["eval_loss"] < got["losses"][0] - 0.1, "eval of the first batch sees the trained weights"


def test_cp2_trains_as_one_process_resumes_exactly_and_reshards_to_cp1(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    straight = run_resume("save", 2, ckpt, tmp_path / "straight.pt", "parallel.cp=2", STEPS)
    hold_to_reference("cp2", [straight["losses"][s] for s in sorted(straight["losses"])], straight["params"],
                      [STEPS])
    resumed = run_resume("load", 2, ckpt, tmp_path / "resumed.pt", "parallel.cp=2", STEPS)
    assert resumed["client_state"] == {"step": SAVE_AT}
    assert resumed["losses"] == {s: v for s, v in straight["losses"].items() if s >= SAVE_AT}
    for name, value in straight["params"].items():
        assert torch.equal(resumed["params"][name], value), name
    cp1 = run_resume("load", 1, ckpt, tmp_path / "cp1.pt", STEPS)
    expected = {s: v for s, v in straight["losses"].items() if s >= SAVE_AT}
    assert cp1["losses"].keys() == expected.keys()
    for step, loss in cp1["losses"].items():
        assert loss == pytest.approx(expected[step], rel=RTOL), step
    for name, value in straight["params"].items():
        torch.testing.assert_close(cp1["params"][name], value, rtol=0, atol=PARAM_ATOL)
