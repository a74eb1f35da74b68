"""The job spec: every rule reports its dotted path, the bad value and what is allowed; all problems at once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.errors import SpecError
from orchestrator.spec import spec_to_yaml
from orchestrator.validate import field_help, load_spec, parse_spec, spec_to_dict


def problems(raw: dict, overrides: tuple[str, ...] = (), **kw) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(raw, overrides=overrides, **kw)
    return [str(p) for p in info.value.problems]


def test_defaults_resolve():
    spec = parse_spec({})
    assert spec.parallel.dp == 1
    assert spec.parallel.global_batch_size == spec.parallel.micro_batch_size
    assert spec.model.n_kv_heads == spec.model.n_heads
    assert spec.model.ffn_dim % spec.model.multiple_of == 0 and spec.model.ffn_dim >= 8 * spec.model.dim / 3
    assert spec.checkpoint.dir == "runs/pretrain/checkpoints"


def test_interpolation_follows_name():
    assert parse_spec({"name": "exp7"}).checkpoint.dir == "runs/exp7/checkpoints"


def test_unknown_key_suggests_the_close_name():
    assert problems({"parallel": {"tpp": 2}}) == ["parallel.tpp: unknown key (did you mean 'parallel.tp'?)"]


def test_unknown_key_found_in_another_section():
    assert problems({"zero_stage": 2}) == ["zero_stage: unknown key (did you mean 'parallel.zero_stage'?)"]


def test_unknown_key_without_a_close_name_lists_the_allowed_ones():
    (message,) = problems({"optim": {"zzz": 1}})
    assert message.startswith("optim.zzz: unknown key; allowed here: lr, min_lr")


def test_unknown_section():
    (message,) = problems({"modle": {"dim": 64}})
    assert message == "modle: unknown key (did you mean 'model'?)"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"model": {"dim": "wide"}}, "model.dim: got 'wide', expected an integer"),
        ({"optim": {"lr": "fast"}}, "optim.lr: got 'fast', expected a number"),
        ({"parallel": {"compile": "maybe"}}, "parallel.compile: got 'maybe', expected true or false"),
        ({"model": {"n_kv_heads": [1]}}, "model.n_kv_heads: got [1], expected an integer or null"),
        ({"model": 5}, "model: got 5, expected a section (a mapping of keys)"),
    ],
)
def test_wrong_types(raw, expected):
    assert problems(raw) == [expected]


def test_numbers_as_strings_are_accepted():
    assert parse_spec({"optim": {"lr": "3e-4"}}).optim.lr == pytest.approx(3e-4)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"parallel": {"zero_stage": 4}}, "parallel.zero_stage: got 4, allowed: 0, 1, 2, 3"),
        ({"parallel": {"backend": "megatron"}},
         "parallel.backend: got 'megatron', allowed: 'auto', 'deepspeed', 'native'"),
        ({"model": {"n_layers": 0}}, "model.n_layers: got 0, must be ≥ 1"),
        ({"optim": {"beta2": 1.5}}, "optim.beta2: got 1.5, must be ≤ 1.0"),
        ({"metrics": {"port": 70000}}, "metrics.port: got 70000, must be ≤ 65535"),
    ],
)
def test_out_of_range(raw, expected):
    assert problems(raw) == [expected]


def test_layout_must_fill_the_ranks():
    (message,) = problems({"parallel": {"dp": 2, "tp": 2}, "resources": {"gpus_per_node": 8}})
    assert message == ("parallel: dp=2 × pp=1 × tp=2 = 4, but the run has 8 ranks "
                       "(resources.num_nodes=1 × resources.gpus_per_node=8)")


def test_open_dp_must_divide():
    (message,) = problems({"parallel": {"tp": 4}, "model": {"n_heads": 4}, "resources": {"gpus_per_node": 6}})
    assert message.startswith("parallel: pp=1 × tp=4 = 4 does not divide 6 ranks")


def test_open_dp_is_filled_from_the_ranks():
    spec = parse_spec({"parallel": {"tp": 2, "pp": 2, "grad_accum": 2},
                       "resources": {"num_nodes": 2, "gpus_per_node": 8}})
    assert spec.parallel.dp == 4


def test_layers_divide_into_stages():
    raw = {"model": {"n_layers": 5}, "parallel": {"pp": 2, "grad_accum": 2}, "resources": {"gpus_per_node": 2}}
    assert problems(raw) == ["model.n_layers: 5 layers do not split into parallel.pp=2 equal pipeline stages"]


def test_heads_divide_by_tp():
    raw = {"model": {"dim": 96, "n_heads": 3}, "parallel": {"tp": 2}, "resources": {"gpus_per_node": 2}}
    assert problems(raw) == [
        "model.n_heads: 3 heads are not divisible by parallel.tp=2",
        "model.n_kv_heads: 3 key/value heads are not divisible by parallel.tp=2",
    ]


def test_kv_heads_divide_by_tp():
    raw = {"model": {"dim": 256, "n_heads": 4, "n_kv_heads": 1}, "parallel": {"tp": 2},
           "resources": {"gpus_per_node": 2}}
    assert problems(raw) == ["model.n_kv_heads: 1 key/value heads are not divisible by parallel.tp=2"]


def test_kv_heads_divide_heads():
    expected = ["model.n_kv_heads: 3 does not divide model.n_heads=4"]
    assert problems({"model": {"n_heads": 4, "n_kv_heads": 3}}) == expected


def test_hidden_divides_by_heads():
    assert problems({"model": {"dim": 100, "n_heads": 8}}) == ["model.dim: 100 is not divisible by model.n_heads=8"]


def test_head_size_even_for_rope():
    assert problems({"model": {"dim": 36, "n_heads": 4}}) == ["model.dim: head size 36/4 = 9 must be even for RoPE"]


def test_vocab_divides_by_tp():
    raw = {"model": {"vocab_size": 1001}, "parallel": {"tp": 2}, "resources": {"gpus_per_node": 2}}
    assert problems(raw) == ["model.vocab_size: 1001 is not divisible by parallel.tp=2 (vocab-parallel embedding)"]


def test_tensor_parallel_group_split_over_nodes_is_refused_before_anything_is_reserved():
    raw = {"resources": {"num_nodes": 2, "gpus_per_node": 1}, "parallel": {"tp": 2}}
    assert problems(raw) == ["parallel.tp: tensor-parallel groups of 2 ranks would span nodes: each of the "
                             "resources.num_nodes=2 nodes runs resources.gpus_per_node=1 consecutive ranks; make "
                             "gpus_per_node a multiple of 2 or lower parallel.tp"]
    assert parse_spec({"resources": {"num_nodes": 2, "gpus_per_node": 2}, "parallel": {"tp": 2}}).parallel.dp == 2


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_2_3_refused_with_pipeline(stage):
    raw = {"parallel": {"backend": "deepspeed", "pp": 2, "zero_stage": stage}, "resources": {"gpus_per_node": 2}}
    (message,) = problems(raw)
    assert message.startswith(f"parallel.zero_stage: ZeRO stage {stage} with parallel.pp=2: DeepSpeed's pipeline")


@pytest.mark.parametrize(("parallel", "model", "expected"), [
    ({}, {}, "native"),
    ({"zero_stage": 3, "tp": 2, "pp": 2, "grad_accum": 2}, {}, "native"),
    ({"offload_optimizer": True}, {}, "deepspeed"),
    ({"pp": 2, "grad_accum": 2}, {"tie_embeddings": True}, "deepspeed"),
    ({"backend": "deepspeed"}, {}, "deepspeed"),
])
def test_auto_backend_is_native_unless_only_deepspeed_runs_the_spec(parallel, model, expected):
    raw = {"parallel": parallel, "model": {"n_layers": 4, **model}, "resources": {"gpus_per_node": 8}}
    assert parse_spec(raw).parallel.backend == expected


def test_zero_3_with_pipeline_allowed_on_native():
    raw = {"parallel": {"pp": 2, "zero_stage": 3, "backend": "native", "grad_accum": 2},
           "resources": {"gpus_per_node": 2}}
    assert parse_spec(raw).parallel.zero_stage == 3


def test_global_batch_is_the_product():
    raw = {"parallel": {"micro_batch_size": 4, "grad_accum": 2, "global_batch_size": 10},
           "resources": {"gpus_per_node": 2}}
    assert problems(raw) == ["parallel.global_batch_size: 10 ≠ micro_batch_size=4 × grad_accum=2 × dp=2 = 16"]


def shards(tmp_path: Path, seq_len: int = 256, vocab: int = 1000) -> str:
    (tmp_path / "manifest.json").write_text(json.dumps({"seq_len": seq_len, "tokenizer": {"vocab_size": vocab}}))
    return str(tmp_path)


def test_seq_len_within_the_data(tmp_path):
    raw = {"data": {"path": shards(tmp_path, seq_len=128), "seq_len": 256}}
    (message,) = problems(raw)
    assert message.startswith("data.seq_len: 256 is longer than the shards' seq_len 128")


def test_vocab_taken_from_the_data_and_padded(tmp_path):
    spec = parse_spec({"data": {"path": shards(tmp_path, vocab=1000)}, "parallel": {"tp": 2},
                       "resources": {"gpus_per_node": 2}})
    assert spec.model.vocab_size == 1024


def test_vocab_not_smaller_than_the_tokenizer(tmp_path):
    raw = {"data": {"path": shards(tmp_path, vocab=1000)}, "model": {"vocab_size": 512}}
    assert problems(raw) == ["model.vocab_size: 512 is smaller than the tokenizer's 1000 tokens"]


def test_missing_shards_when_required(tmp_path):
    (message,) = problems({"data": {"path": str(tmp_path)}}, require_data=True)
    assert message == f"data.path: no manifest.json in {str(tmp_path)!r}; run `pretrain prep` first"


def test_broken_manifest_named(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    (message,) = problems({"data": {"path": str(tmp_path)}})
    assert message.startswith(f"data.path: cannot read {tmp_path}/manifest.json")


def test_schedule_and_lr_rules():
    raw = {"schedule": {"steps": 10, "warmup_steps": 20}, "optim": {"lr": 1e-4, "min_lr": 1e-3},
           "resources": {"num_nodes": 1, "min_nodes": 2}}
    assert problems(raw) == [
        "schedule.warmup_steps: 20 is more than schedule.steps=10",
        "optim.min_lr: 0.001 is above optim.lr=0.0001",
        "resources.min_nodes: 2 is more than resources.num_nodes=1",
    ]


def test_all_problems_reported_together():
    raw = {"model": {"dim": "x", "n_layer": 3}, "parallel": {"zero_stage": 9}, "optim": {"lr": -1}}
    assert problems(raw, ("schedule.steps=0",)) == [
        "model.dim: got 'x', expected an integer",
        "model.n_layer: unknown key (did you mean 'model.n_layers'?)",
        "parallel.zero_stage: got 9, allowed: 0, 1, 2, 3",
        "optim.lr: got -1.0, must be ≥ 0.0",
        "schedule.steps: got 0, must be ≥ 1",
    ]


def test_rule_skipped_when_its_field_is_already_bad():
    raw = {"parallel": {"tp": "two"}, "model": {"n_heads": 3, "dim": 96}}
    assert problems(raw) == ["parallel.tp: got 'two', expected an integer"]


def test_overrides_apply_and_are_checked():
    spec = parse_spec({}, overrides=("parallel.zero_stage=2", "optim.lr=1e-3"))
    assert (spec.parallel.zero_stage, spec.optim.lr) == (2, 1e-3)
    assert problems({}, ("parallel.tp",)) == ["override 'parallel.tp' is not of the form section.key=value"]


def test_overrides_of_unknown_keys_suggest():
    assert problems({}, ("parallel.tpp=2",)) == ["parallel.tpp: unknown key (did you mean 'parallel.tp'?)"]


def test_override_with_unparsable_value_is_reported():
    (message,) = problems({}, ("name=\x1f",))
    assert message.startswith("cannot apply overrides")


def test_yaml_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model:\n  dim: [1, 2\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}: 1 problem\n  not valid YAML at line 3")


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(SpecError, match="cannot read the file: No such file or directory"):
        load_spec(tmp_path / "nope.yaml")


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="expected a mapping of sections, got list"):
        load_spec(path)


def test_round_trip_through_yaml(tmp_path):
    spec = parse_spec({"name": "r", "parallel": {"tp": 2}, "resources": {"gpus_per_node": 4}})
    again = parse_spec(yaml.safe_load(spec_to_yaml(spec)))
    assert spec_to_dict(again) == spec_to_dict(spec)


def test_every_field_documented():
    undocumented = [path for path, _, help_text in field_help() if not help_text]
    assert undocumented == []


@pytest.mark.parametrize("example", sorted(Path(__file__).resolve().parents[2].glob("examples/*.yaml")))
def test_examples_validate(example):
    if yaml.safe_load(example.read_text()).get("model") is None:
        pytest.skip("not a job spec")
    assert load_spec(example).name


def test_cli_reports_without_traceback(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("parallel: {tpp: 2}\n")
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "validate", str(path), "optim.lr=x"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        f"pretrain validate: {path}: 2 problems",
        "  parallel.tpp: unknown key (did you mean 'parallel.tp'?)",
        "  optim.lr: got 'x', expected a number",
    ]


def test_cli_usage_error_exit_2():
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "validate"], capture_output=True, text=True)
    assert done.returncode == 2 and "the following arguments are required: spec" in done.stderr


PATHS = [path for path, _, _ in field_help()] + ["model.dimm", "nope", "parallel", "optim.lr.x", ""]
VALUES = st.one_of(
    st.integers(-(2**40), 2**40), st.floats(allow_nan=True), st.booleans(), st.none(),
    st.text(max_size=12), st.sampled_from(["[1, 2]", "{a: 1}", "${name}", "${nope}", "null", "1e-3", "x=y"]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(PATHS), VALUES), max_size=6))
def test_random_overrides_fail_only_cleanly(pairs):
    overrides = [f"{path}={value}" for path, value in pairs]
    try:
        spec = parse_spec({}, overrides=overrides)
    except SpecError as e:
        assert e.problems and all(str(p) for p in e.problems)
    else:
        assert spec.parallel.dp * spec.parallel.pp * spec.parallel.tp == spec.world_size


@pytest.mark.parametrize(("module", "allowed"), [
    ("orchestrator.config_parser", {"orchestrator", "orchestrator.errors", "orchestrator.config_parser"}),
    ("dataprep.config", {"orchestrator", "orchestrator.errors", "orchestrator.config_parser", "dataprep",
                         "dataprep.config"}),
])
def test_the_config_parser_and_the_prep_config_know_no_job_spec(module, allowed):
    code = (f"import json, sys, {module}; print(json.dumps([m for m in sys.modules "
            "if m.split('.')[0] in ('orchestrator', 'dataprep', 'parallel', 'cluster')]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert set(json.loads(done.stdout)) == allowed
