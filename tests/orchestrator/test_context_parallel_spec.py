"""`parallel.cp` in the spec, the planner and rank placement: its refusals name the field, the memory model divides
activations by cp, the planner turns to cp when tensor parallelism cannot go further, and cp groups stay in a node."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator.cli import main
from orchestrator.errors import SpecError
from orchestrator.planner.layout import Hardware, choose_layout, evaluate
from orchestrator.planner.memory import GiB, activation_bytes
from orchestrator.planner.memory_native import context_parallel_kv_bytes, native_memory
from orchestrator.validate import load_spec, parse_spec, spec_to_dict
from parallel.parallel_dims import ParallelDims

BASE = {"model": {"vocab_size": 128, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2},
        "data": {"seq_len": 32}, "parallel": {"backend": "native", "cp": 2},
        "resources": {"device": "cpu", "gpus_per_node": 2}}


def spec_with(**sections) -> dict:
    raw = {k: dict(v) for k, v in BASE.items()}
    for section, values in sections.items():
        raw[section].update(values)
    return raw


@pytest.mark.parametrize("sections,message", [
    ({"parallel": {"backend": "deepspeed"}}, r"parallel\.cp: 2 needs parallel\.backend=native; the DeepSpeed engine "
                                             r"has no context parallelism"),
    ({"data": {"seq_len": 30}}, r"data\.seq_len: 30 is not divisible by 2 × parallel\.cp=2"),
    ({"eval": {"tasks": "hellaswag"}}, r"eval\.tasks: downstream tasks with parallel\.cp=2 are not supported"),
    ({"resources": {"num_nodes": 2, "gpus_per_node": 2}, "parallel": {"tp": 2}},
     r"parallel\.cp: cp=2 × tp=2 ranks would span nodes"),
    ({"parallel": {"dp": 2}}, r"parallel: dp=2 × cp=2 × pp=1 × tp=1 = 4, but the run has 2 ranks"),
], ids=["deepspeed", "seq-len", "eval-tasks", "spans-nodes", "world"])
def test_a_layout_cp_cannot_run_is_refused_naming_the_field(sections: dict, message: str) -> None:
    raw = spec_with(**{k: v for k, v in sections.items() if k in BASE})
    raw.update({k: v for k, v in sections.items() if k not in BASE})
    with pytest.raises(SpecError, match=message):
        parse_spec(raw)


def test_cp_fills_the_world_with_dp_and_leaves_the_global_batch_to_dp() -> None:
    spec = parse_spec(spec_with(resources={"gpus_per_node": 8}, parallel={"tp": 2}))
    assert (spec.parallel.dp, spec.parallel.cp, spec.parallel.tp) == (2, 2, 2)
    assert spec.parallel.global_batch_size == spec.parallel.micro_batch_size * spec.parallel.grad_accum * 2


def test_sliding_windows_soft_caps_and_document_masks_are_accepted_under_cp() -> None:
    spec = parse_spec(spec_with(model={"sliding_window": 8, "attn_softcap": 20.0, "attention_mask": "document",
                                       "rope_positions": "document"}))
    assert (spec.parallel.cp, spec.model.attention_mask) == (2, "document")


def test_native_memory_divides_activations_by_cp_and_shards_weights_over_dp_and_cp(repo_root) -> None:
    spec = load_spec(repo_root / "examples" / "llama-1b.yaml")
    raw = spec_to_dict(spec)
    raw["data"]["seq_len"] = 32768
    raw["parallel"].update(backend="native", dp=1, micro_batch_size=1, grad_accum=1, global_batch_size=0,
                           compile=False, precision="bf16")
    raw["resources"].update(num_nodes=1, gpus_per_node=1)
    one = parse_spec(raw)
    raw["parallel"]["cp"], raw["resources"]["gpus_per_node"] = 4, 4
    four = parse_spec(raw)
    a, b = native_memory(one, one.parallel), native_memory(four, four.parallel)
    width = 2
    whole = activation_bytes(one.model, 32768, one.parallel, 0, width)
    kv = context_parallel_kv_bytes(four.model, 32768, four.parallel, width)
    assert b.activations == whole // 4 + kv
    assert 0 < kv < whole // 40, "one layer's gathered keys and values are small beside the activations"
    assert b.activations < a.activations / 3
    assert b.weights == a.weights // 4 and b.optimizer == a.optimizer // 4


def test_the_planner_turns_to_cp_where_tensor_parallelism_runs_out_of_heads(repo_root) -> None:
    """Two key/value heads allow tp ≤ 2; a 128k sequence of a 1B model then fits 12 GiB only with cp (16 GiB
    with tp2 and the loss in slices)."""
    raw = spec_to_dict(load_spec(repo_root / "examples" / "llama-1b.yaml"))
    raw["data"]["seq_len"] = 131072
    raw["model"]["n_kv_heads"] = 2
    raw["parallel"].update(backend="native", dp=0, micro_batch_size=1, grad_accum=1, global_batch_size=0)
    raw["resources"].update(num_nodes=1, gpus_per_node=8)
    spec = parse_spec(raw)
    plan = choose_layout(spec, gpus=8, gpu_mem_bytes=12 * GiB, gpus_per_node=8)
    assert all(c.parallel.cp > 1 for c in plan.ranked), "cp is considered only when nothing fits without it"
    best = plan.parallel
    assert best.cp * best.tp <= 8 and best.dp * best.cp * best.pp * best.tp == 8
    assert plan.best.step.cp_comm > 0 and f"cp={best.cp}" in plan.explanation[1]
    assert plan.best.memory.total <= 12 * GiB
    without = dataclasses.replace(best, cp=1, dp=best.dp * best.cp)
    assert native_memory(spec, without).total > 12 * GiB


@pytest.mark.parametrize("nodes,per_node,cp,tp", [(2, 4, 2, 2), (2, 8, 4, 1), (4, 4, 2, 1)])
def test_context_parallel_groups_stay_inside_a_node(nodes: int, per_node: int, cp: int, tp: int) -> None:
    """Ranks run node by node (`cluster.placement`: rank // gpus_per_node); a valid spec's cp and tp peers share
    one."""
    spec = parse_spec(spec_with(resources={"num_nodes": nodes, "gpus_per_node": per_node},
                                parallel={"cp": cp, "tp": tp}))
    world = spec.world_size
    for rank in range(world):
        dims = ParallelDims.from_spec(spec, world, rank)
        peers = [dims.rank_of(dims.pp_rank, dims.dp_rank, t, c) for c in range(cp) for t in range(tp)]
        assert rank in peers and len({peer // per_node for peer in peers}) == 1


def test_pretrain_plan_shows_cp_and_the_specs_cp_layout(repo_root, capsys) -> None:
    overrides = ["data.seq_len=131072", "model.n_kv_heads=2", "parallel.backend=native", "parallel.cp=4",
                 "parallel.micro_batch_size=1", "parallel.grad_accum=1", "parallel.global_batch_size=0",
                 "parallel.dp=0", "resources.gpus_per_node=8"]
    assert main(["plan", str(repo_root / "examples" / "llama-1b.yaml"), *overrides, "--gpus", "8", "--gpu-mem", "12",
                 "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "the spec's layout on 8 GPUs: dp=2 cp=4 pp=1 tp=1" in out
    table = out.split("fastest layouts for 8 GPUs × 12 GiB (8 per node)")[1].splitlines()
    assert table[1].split()[:5] == ["#", "dp", "cp", "pp", "tp"]
    assert int(table[2].split()[2]) > 1
    slices = table[1].split().index("slices")  # a column only where some layout shown runs the loss in slices
    assert table[2].split()[slices] == "8"


def test_full_checkpointing_gathers_the_keys_and_values_again_and_selective_keeps_them(repo_root) -> None:
    """Full checkpointing gathers a block's keys and values again in the backward, selective keeps them
    (tests/parallel/test_activation_checkpoint.py reads both from the compiled graphs). The step time counts a
    third gather for full only; the memory, the whole sequence's keys and values of every block for selective."""
    raw = spec_to_dict(load_spec(repo_root / "examples" / "llama-1b.yaml"))
    raw["data"]["seq_len"] = 32768
    raw["parallel"].update(backend="native", dp=1, cp=2, micro_batch_size=1, grad_accum=1, global_batch_size=0)
    raw["resources"].update(num_nodes=1, gpus_per_node=2)
    hw = Hardware(gpus=2, gpu_mem_bytes=141 * GiB, gpus_per_node=2)
    comm, activations = {}, {}
    for mode in ("none", "selective", "full"):
        raw["parallel"]["activation_checkpointing"] = mode
        candidate = evaluate(parse_spec(raw), hw)
        comm[mode], activations[mode] = candidate.step.cp_comm, candidate.memory.activations
    assert comm["full"] == pytest.approx(comm["none"] * 3 / 2)
    assert comm["selective"] == comm["none"]
    model = parse_spec(raw).model
    kv = model.dim * model.n_kv_heads // model.n_heads
    gathered = model.n_layers * 32768 * 2 * kv * 2  # keys and values of the whole sequence, bf16, every block
    raw["parallel"]["activation_checkpointing"] = "selective"
    without_cp = evaluate(parse_spec(raw | {"parallel": {**raw["parallel"], "cp": 1, "dp": 2}}), hw).memory
    assert activations["selective"] - without_cp.activations // 2 >= gathered
