"""Every refusal the engines raise at start is a job-spec rule: `pretrain validate` refuses the spec first.

The engines' sources (and the modules they apply parallelism through) are scanned for `raise SpecError`,
`raise UserError` and `raise ValueError` sites. Each site must be listed here, either with specs that trigger it
(refused by `pretrain validate` with exit 2 and the field named, while the same spec without the offending setting
passes) or as a check of something no spec decides (a checkpoint directory, a contract between modules).
A new refusal in an engine fails this test until validation covers it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.planner.layout import Hardware, plan_layouts
from orchestrator.validate import parse_spec

REPO = Path(__file__).resolve().parents[2]
SCANNED = ["parallel/engine.py", "parallel/deepspeed_engine.py", "parallel/native_engine.py",
           "parallel/parallelize.py", "parallel/parallel_dims.py", "parallel/dtensor_tp.py",
           "parallel/native_pipeline.py", "parallel/megatron_tp.py", "parallel/deepspeed_pipeline.py",
           "parallel/model.py", "parallel/fsdp.py", "parallel/activation_checkpoint.py", "parallel/compile.py",
           "parallel/expert_parallel.py"]
RAISE = re.compile(r"raise (SpecError|UserError|ValueError)\(f?[\"']([^\"']{0,40})")
BASE = "model: {n_layers: 4, n_heads: 4, dim: 256}\n"


@dataclass(frozen=True)
class Case:
    """A spec (`good` overrides, which validate) made invalid by `bad`; the refusal names `field`."""

    good: tuple[str, ...]
    bad: tuple[str, ...]
    field: str
    manifest: dict | None = None


TOKENIZER = {"seq_len": 512, "tokenizer": {"vocab_size": 1000}}
TP3 = ("resources.gpus_per_node=3", "parallel.tp=3", "model.n_heads=6", "model.dim=384", "model.ffn_dim=1026")

LOADER = "the loader's contract (a step is grad_accum micro-batches), whatever the spec"
# (file, start of the message) → the specs that would reach it, or why no spec can.
REFUSALS: dict[tuple[str, str], list[Case] | str] = {
    ("parallel/parallel_dims.py", "parallel: dp="): [
        Case(("resources.gpus_per_node=4", "parallel.dp=4"), ("parallel.dp=3",), "parallel"),
        Case(("resources.gpus_per_node=4", "parallel.tp=2"), ("parallel.tp=3",), "parallel"),
    ],
    ("parallel/megatron_tp.py", "dimension {shape[shard_dim]} of a"): [
        Case(("resources.gpus_per_node=2", "parallel.tp=2"), ("model.n_heads=1",), "model.n_heads"),
        Case(("resources.gpus_per_node=2", "parallel.tp=2", "model.n_kv_heads=2"), ("model.n_kv_heads=1",),
             "model.n_kv_heads"),
        Case(("resources.gpus_per_node=2", "parallel.tp=2", "model.ffn_dim=100"), ("model.ffn_dim=101",),
             "model.ffn_dim"),
        Case(("resources.gpus_per_node=2", "parallel.tp=2", "model.multiple_of=1", "model.dim=16"), ("model.dim=8",),
             "model.ffn_dim"),
        Case(("resources.gpus_per_node=2", "parallel.tp=2", "model.vocab_size=1000"), ("model.vocab_size=1001",),
             "model.vocab_size"),
        Case(TP3 + ("model.vocab_size=1029",), ("model.vocab_size=1030",),
             "model.vocab_size"),
        Case(TP3 + ("model.vocab_size=1026",), ("model.vocab_size=null",), "model.vocab_size", TOKENIZER),
    ],
    ("parallel/megatron_tp.py", "Megatron-style tensor parallelism has no"): [
        Case(("resources.gpus_per_node=2", "parallel.tp=2", "model.moe.num_experts=4"), ("parallel.backend=deepspeed",),
             "parallel.backend"),
    ],
    ("parallel/activation_checkpoint.py", "activation checkpointing mode {mode!r}"): [
        Case(("parallel.activation_checkpointing=full",), ("parallel.activation_checkpointing=every",),
             "parallel.activation_checkpointing"),
    ],
    ("parallel/activation_checkpoint.py", "activation checkpointing every {every} b"): [
        Case(("parallel.activation_checkpointing=every_n",), ("parallel.activation_checkpointing_every=0",),
             "parallel.activation_checkpointing_every"),
    ],
    ("parallel/model.py", "model.vocab_size must be resolved"): [
        Case(("model.vocab_size=512",), ("model.vocab_size=null",), "model.vocab_size", {"seq_len": 512}),
    ],
    ("parallel/engine.py", "parallel.backend: {spec.parallel.backend"): [
        Case(("parallel.backend=native",), ("parallel.backend=megatron",), "parallel.backend"),
    ],
    ("parallel/engine.py", "a step takes grad_accum={grad_accum}"): LOADER,
    ("parallel/native_engine.py", "forward_logits: a pipelined layout has n"): [
        Case(("resources.gpus_per_node=2", "parallel.pp=2", "parallel.grad_accum=2", "parallel.backend=native"),
             ("eval.tasks=arc_easy",), "eval.tasks"),
    ],
    ("parallel/native_engine.py", "forward_logits: under parallel.cp > 1 a "): [
        Case(("resources.gpus_per_node=2", "parallel.cp=2", "parallel.backend=native"), ("eval.tasks=arc_easy",),
             "eval.tasks"),
    ],
    ("parallel/deepspeed_engine.py", "forward_logits: a pipelined layout has n"): [
        Case(("resources.gpus_per_node=2", "parallel.pp=2", "parallel.backend=deepspeed"), ("eval.tasks=arc_easy",),
             "eval.tasks"),
    ],
    ("parallel/native_engine.py", "evaluation under pipelining takes a"): LOADER,
    ("parallel/deepspeed_engine.py", "spikes.action: skip needs parallel.backe"): [
        Case(("parallel.backend=deepspeed", "spikes.action=rewind"), ("spikes.action=skip",), "spikes.action"),
    ],
    ("parallel/deepspeed_engine.py", "{directory}: written with"): "a checkpoint of another layout loaded without "
                                                                   "the means to convert it: no spec setting",
}

# Refusals moved from the engines into validation: now an assertion in `parallelize_model`.
MOVED = [
    Case(("resources.gpus_per_node=2", "parallel.tp=2", "parallel.sequence_parallel=true", "data.seq_len=64"),
         ("data.seq_len=63",), "data.seq_len"),
    Case(("resources.gpus_per_node=2", "parallel.tp=2", "data.seq_len=63"), ("parallel.sequence_parallel=true",),
         "data.seq_len"),
    # `apply_expert_parallel` asserts the experts split over ep.
    Case(("resources.gpus_per_node=2", "model.moe.num_experts=4", "parallel.ep=2"), ("model.moe.num_experts=3",),
         "parallel.ep"),
]


def raise_sites() -> set[tuple[str, str]]:
    sites = set()
    for name in SCANNED:
        for match in RAISE.finditer((REPO / name).read_text()):
            sites.add((name, match.group(2)))
    return sites


def listed(site: tuple[str, str], key: tuple[str, str]) -> bool:
    return site[0] == key[0] and site[1].startswith(key[1])


def test_every_refusal_of_the_engines_is_listed():
    sites = raise_sites()
    unlisted = [site for site in sites if not any(listed(site, key) for key in REFUSALS)]
    assert unlisted == [], "refusals with no validation case: add one here and a rule to orchestrator.validate"
    stale = [key for key in REFUSALS if not any(listed(site, key) for site in sites)]
    assert stale == [], "listed refusals no engine raises any more"


def test_refusals_moved_into_validation_are_gone_from_the_engines():
    for name in ("parallel/native_engine.py", "parallel/deepspeed_engine.py"):
        assert "seq_len % " not in (REPO / name).read_text()
    assert "spec.data.seq_len % dims.tp" in (REPO / "parallel/parallelize.py").read_text()


def validate(tmp_path: Path, overrides: tuple[str, ...], manifest: dict | None, capsys) -> tuple[int, str]:
    spec = tmp_path / "job.yaml"
    spec.write_text(BASE)
    argv = ["validate", str(spec), *overrides]
    if manifest is not None:
        data = tmp_path / "shards"
        data.mkdir(exist_ok=True)
        (data / "manifest.json").write_text(json.dumps(manifest))
        argv += [f"data.path={data}", "--require-data"]
    code = main(argv)
    return code, capsys.readouterr().err


CASES = [pytest.param(case, id=f"{site[0].split('/')[-1]}:{case.field}:{'+'.join(case.bad)}")
         for site, cases in REFUSALS.items() if isinstance(cases, list) for case in cases]
CASES += [pytest.param(case, id=f"moved:{case.field}:{'+'.join(case.bad)}") for case in MOVED]


@pytest.mark.parametrize("case", CASES)
def test_validate_refuses_what_an_engine_would(case: Case, tmp_path: Path, capsys):
    code, err = validate(tmp_path, case.good, case.manifest, capsys)
    assert code == 0, err
    code, err = validate(tmp_path, case.good + case.bad, case.manifest, capsys)
    assert code == 2, err
    assert re.search(rf"^  {re.escape(case.field)}: ", err, re.MULTILINE), err
    assert "Traceback" not in err


def test_the_planner_skips_layouts_sequence_parallelism_cannot_split():
    """Layouts with tp > 1 run sequence parallel; a sequence that does not split over tp rules them out."""
    spec = parse_spec({"model": {"n_layers": 4, "n_heads": 8, "dim": 512, "vocab_size": 1024},
                       "data": {"seq_len": 20}, "parallel": {"grad_accum": 2}})
    plan = plan_layouts(spec, Hardware(gpus=8, gpu_mem_bytes=2**40, gpus_per_node=8), 8)
    assert all(c.parallel.tp in (1, 2, 4) for c in plan.ranked)
    assert any(c.parallel.tp == 4 for c in plan.ranked)
    assert any(reason.startswith("data.seq_len: 20 is not divisible by parallel.tp=8") for reason in plan.broke_rules)
