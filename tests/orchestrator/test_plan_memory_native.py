"""The native engine's memory model against the peaks measured on H200s: `torch.cuda.max_memory_allocated`, the
largest over ranks, as benchmarks/gpu_backends.py records it in benchmarks/results/. Each run of the native engine in
the files below is rebuilt from the spec it ran (the example named, with the run's layout) and must come within 10%;
so is every native run of any H200 result file that records its whole `parallel` section (tp, pp, sequence
parallelism, compile, every checkpointing mode, float8), rebuilt from that section as it ran.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from orchestrator.config_parser import load_yaml
from orchestrator.planner.counting import count_params
from orchestrator.planner.memory import GiB, estimate_memory, memory_model
from orchestrator.spec import JobSpec
from orchestrator.validate import parse_spec

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
# result file → the example spec its runs were made from
MEASURED = {
    "gpu_backends_2gpu_h200_8b_ac.json": "llama-8b.yaml",  # seq 4096, mb 1, dp2 ZeRO-3, none/full/selective
    "gpu_backends_1gpu_h200_native.json": "llama-1b.yaml",  # seq 2048, mb 8, one GPU
    "gpu_backends_2gpu_h200_native.json": "llama-1b.yaml",  # dp2 ZeRO-1 and ZeRO-3
    "gpu_backends_1gpu_h200_native_mbs16.json": "llama-1b.yaml",
    "gpu_backends_2gpu_h200_native_zero3_mbs16.json": "llama-1b.yaml",
    "gpu_backends_4gpu_h200_steps5_x4host.json": "llama-1b.yaml",  # dp4 ZeRO-1 and ZeRO-3
}
TOLERANCE = 0.10
# the specs whose runs record their `parallel` section, told apart by parameter count
SPECS = ("examples/llama-1b.yaml", "examples/llama-8b.yaml", "examples/moe-1b-7b.yaml",
         "benchmarks/specs/moe-1b-7b-dense-twin.yaml")


def native_runs() -> list[tuple[str, str, dict, int]]:
    """(file, example, run, seq_len) of every native run in the files of MEASURED."""
    runs = []
    for name, example in MEASURED.items():
        document = json.loads((RESULTS / name).read_text())
        measured = document.get("ours", document)
        runs += [(name, example, run, measured["seq_len"]) for run in measured["results"]
                 if run["run"].startswith("native-")]
    return runs


def measured_spec(example: str, run: dict, seq_len: int) -> JobSpec:
    """The spec the run trained: the example's model and parallel section, with the run's layout."""
    raw = load_yaml(REPO / "examples" / example, empty="")
    zero = re.search(r"-zero(\d)", run["run"])
    mode = re.search(r"-ac(\w+)", run["run"])
    parallel = {**raw["parallel"], "backend": "native", "dp": run["gpus"], "pp": 1, "tp": 1,
                "micro_batch_size": run["micro_batch_size"], "grad_accum": run["grad_accum"]}
    parallel |= {"zero_stage": int(zero.group(1))} if zero else {}
    parallel |= {"activation_checkpointing": mode.group(1)} if mode else {}
    return parse_spec({"model": raw["model"], "data": {"seq_len": seq_len}, "parallel": parallel,
                       "resources": {"num_nodes": 1, "gpus_per_node": run["gpus"], "device": "cuda"}})


def recorded_runs() -> list[tuple[str, dict, dict]]:
    """(file, run, its results block) of every native H200 run that records the `parallel` section it ran."""
    runs = []
    for path in sorted(RESULTS.glob("gpu_backends_*h200*.json")):
        document = json.loads(path.read_text())
        for measured in [document, *(v for v in document.values() if isinstance(v, dict))]:
            runs += [(path.name, run, measured) for run in measured.get("results", [])
                     if run["run"].startswith("native-") and "parallel" in run and run.get("peak_mem_gib")]
    return runs


def recorded_spec(run: dict, seq_len: int) -> JobSpec:
    """The spec of a run that records its `parallel` section: the benchmarked spec with the run's parameter count."""
    for written in SPECS:
        model = load_yaml(REPO / written, empty="")["model"]
        if count_params(parse_spec({"model": model}).model).total == run["params"]:
            return parse_spec({"model": model, "data": {"seq_len": seq_len},
                               "parallel": run["parallel"],
                               "resources": {"num_nodes": 1, "gpus_per_node": run["gpus"], "device": "cuda"}})
    raise AssertionError(f"{run['run']}: no benchmarked spec has {run['params']} parameters")


RUNS = native_runs()
RECORDED = recorded_runs()


def test_the_measured_files_hold_the_runs_the_model_is_checked_on():
    assert len(RUNS) >= 10
    assert {(r["gpus"], r["run"]) for _, _, r, _ in RUNS} >= {
        (1, "native-zero1"), (2, "native-zero1"), (2, "native-zero3"), (2, "native-zero3-acnone"),
        (2, "native-zero3-acfull"), (2, "native-zero3-acselective")}


@pytest.mark.parametrize(("name", "example", "run", "seq_len"), RUNS,
                         ids=[f"{n.removesuffix('.json')}-{r['run']}-{r['gpus']}gpu" for n, _, r, _ in RUNS])
def test_native_estimate_is_within_ten_percent_of_the_measured_peak(name, example, run, seq_len):
    spec = measured_spec(example, run, seq_len)
    if "params" in run:
        assert count_params(spec.model).total == run["params"], "the example is the model that ran"
    estimate = estimate_memory(spec).allocated / GiB
    assert estimate == pytest.approx(run["peak_mem_gib"], rel=TOLERANCE), \
        f"{name} {run['run']}: estimated {estimate:.1f} GiB, measured {run['peak_mem_gib']} GiB"


def test_the_recorded_runs_cover_tp_pp_float8_and_every_checkpointing_mode():
    parallel = [run["parallel"] for _, run, _ in RECORDED]
    assert {p["tp"] for p in parallel} >= {1, 2} and {p["pp"] for p in parallel} >= {1, 2}
    assert {p.get("float8", "none") for p in parallel} >= {"none", "tensorwise", "rowwise"}
    assert {p["activation_checkpointing"] for p in parallel} >= {"none", "full", "selective", "every_n"}
    assert {p.get("ep", 1) for p in parallel} >= {1, 2}, "a mixture of experts under expert parallelism"


@pytest.mark.parametrize(("name", "run", "measured"), RECORDED,
                         ids=[f"{n.removesuffix('.json')}-{r['run']}" for n, r, _ in RECORDED])
def test_native_estimate_is_within_ten_percent_of_each_recorded_layout(name, run, measured):
    estimate = estimate_memory(recorded_spec(run, measured["seq_len"])).allocated / GiB
    assert estimate == pytest.approx(run["peak_mem_gib"], rel=TOLERANCE), \
        f"{name} {run['run']}: estimated {estimate:.1f} GiB, measured {run['peak_mem_gib']} GiB"


def test_each_engine_has_its_own_model():
    """DeepSpeed keeps bf16 weights beside its fp32 master shard; FSDP2 keeps only the fp32 shard and gathers bf16
    copies of the blocks it runs: at 8B under ZeRO-3 the native peak is the lower one."""
    spec = measured_spec("llama-8b.yaml", {"run": "native-zero3-acfull", "gpus": 2, "micro_batch_size": 1,
                                           "grad_accum": 8}, 4096)
    native = memory_model("native")(spec, spec.parallel)
    deepspeed = memory_model("deepspeed")(spec, spec.parallel)
    params = count_params(spec.model).total
    assert native.weights == 4 * params // 2 and deepspeed.weights == 2 * params // 2
    assert native.optimizer == 8 * params // 2 and deepspeed.optimizer == 12 * params // 2
    assert native.allocated < deepspeed.allocated
    with pytest.raises(ValueError, match=r"no memory model for backend 'megatron'; expected 'deepspeed' or 'native'"):
        memory_model("megatron")


def test_selective_under_sequence_parallelism_counts_the_gathered_inputs_it_keeps():
    """Selective checkpointing keeps the column-parallel projections' gathered inputs under tp with sequence
    parallelism: 4 GiB a rank at 8B tp2 (66.9 GiB → 70.9 measured in one call); the estimate holds the second
    closely, which the ten-percent bound alone would not tell from the first."""
    document = json.loads((RESULTS / "gpu_backends_2gpu_h200_8b_tp2_keep_gathered_pp2.json").read_text())
    before, after = (document[k]["results"][0] for k in ("keep_gathered_before", "keep_gathered_after"))
    assert after["peak_mem_gib"] - before["peak_mem_gib"] > 3.5
    measured = document["keep_gathered_after"]
    estimate = estimate_memory(recorded_spec(after, measured["seq_len"])).allocated / GiB
    assert estimate == pytest.approx(after["peak_mem_gib"], rel=0.02)
