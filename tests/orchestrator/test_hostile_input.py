"""Hostile input to every reader of user YAML and JSON: refused in under 2 s with one readable message (exit code 2
on the CLI), never a hang, a crash, a traceback or a silent acceptance.

The documents are built here (alias bombs, deep nesting, oversize, bytes that are not UTF-8, NaN, huge integers,
empty files, wrong types); the random ones are drawn from the config dataclasses' own fields and limits.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dataprep.pipeline  # noqa: F401 (imported once here, so `pretrain prep` is timed on the input, not on Ray's import)
from dataprep.config import PrepConfig, SourceConfig
from dataprep.shards import read_manifest
from orchestrator.cli import main
from orchestrator.config_parser import CONFIG_BOUNDS, WRITTEN_FILE_BOUNDS, loads_json, parse_yaml
from orchestrator.errors import CheckpointError, DataError, SpecError, UserError
from orchestrator.planner.sweep import SweepConfig, load_sweep
from orchestrator.spec import JobSpec
from orchestrator.validate import load_spec
from parallel.checkpoint_layout import read_layout
from parallel.hf import read_hf_config

LIMIT_S = 2.0


def billion_laughs(levels: int = 9) -> str:
    """Nine anchors, each a list of nine aliases of the one before: 9**9 strings once expanded, 1 KB as written."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# (name, file content, what the message says): documents no YAML config may be.
YAML_CASES = [
    ("not-utf8", b"name: caf\xe9\n", r"not UTF-8 text: byte 0xe9 at line 1, column 10"),
    ("alias-bomb", billion_laughs().encode(), r"holds more than 10,000 values \(aliases counted at each use\)"),
    ("self-alias", b"name: &a [*a]\n", r"the alias \*a at line 1 refers to a collection that contains it"),
    ("oversize", b"name: " + b"x" * CONFIG_BOUNDS.max_bytes + b"\n", r"larger than 1,048,576 bytes"),
    ("deep", f"name: {nested(40)}\n".encode(), r"nested deeper than 32 levels at line 1"),
    # libyaml's scanner runs ahead of the events and stops at its own bound
    ("very-deep", f"name: {nested(100_000)}\n".encode(), r"exceeded maximum nesting depth|nested deeper than 32"),
    ("huge-int", b"name: " + b"9" * 5000 + b"\n", r"an integer of 5000 digits is out of every setting's range"),
    ("binary", b"name: !!binary aGVsbG8=\n", r"values tagged tag:yaml.org,2002:binary cannot be config settings"),
    ("list", b"- 1\n- 2\n", r"expected a mapping of sections, got list"),
]


def timed_main(argv: list[str], capsys) -> tuple[int, str]:
    """`pretrain ...` in this process: exit code and stderr, checked for the time bound and against tracebacks.

    The bound is on this process's CPU time, which other work on a shared machine does not stretch; the wall clock
    only guards against a hang."""
    start, cpu = time.perf_counter(), time.process_time()
    code = main(argv)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    err = capsys.readouterr().err
    assert cpu < LIMIT_S and elapsed < 5 * LIMIT_S, f"{argv} took {cpu:.2f} s of CPU, {elapsed:.2f} s in all"
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize(("name", "content", "message"), YAML_CASES, ids=[c[0] for c in YAML_CASES])
@pytest.mark.parametrize("command", ["validate", "prep", "sweep"])
def test_hostile_yaml_is_refused_by_every_command(tmp_path, capsys, command, name, content, message):
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(content)
    code, err = timed_main([command, str(path)], capsys)
    assert code == 2
    assert err.startswith(f"pretrain {command}: {path}: 1 problem\n"), err
    assert len(err.splitlines()) == 2 and re.search(message, err), err


@pytest.mark.parametrize(("command", "needs"), [("validate", "a job spec needs at least one section"),
                                                 ("prep", "a prep config needs at least `output` and `sources`"),
                                                 ("sweep", "a sweep config needs at least `base`")])
@pytest.mark.parametrize("content", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file_says_what_it_needs(tmp_path, capsys, command, needs, content):
    path = tmp_path / "empty.yaml"
    path.write_text(content)
    code, err = timed_main([command, str(path)], capsys)
    assert code == 2 and f"the file is empty: {needs}" in err


@pytest.mark.parametrize(("text", "message"), [
    ("optim: {lr: .nan}", r"optim.lr: got nan, expected a finite number"),
    ("optim: {lr: -.inf}", r"optim.lr: got -inf, expected a finite number"),
    ("optim: {lr: 11}", r"optim.lr: got 11.0, must be ≤ 10.0"),
    ("model: {n_layers: 99999999999999999999999}", r"model.n_layers: got 99999999999999999999999, must be ≤ 1024"),
    ("schedule: {seed: -1}", r"schedule.seed: got -1, must be ≥ 0"),
    ("model: [1, 2]", r"model: got \[1, 2\], expected a section"),
    ("model: {dim: {a: 1}}", r"model.dim: got \{'a': 1\}, expected an integer"),
    ("name: [1]", r"name: got \[1\], expected a string"),
    ("name: " + "${name}" * 101, r"holds 101 interpolations; at most 100 are allowed"),
    ("name: ${oc.decode:'[1]'}", r"name: resolver 'oc.decode' is not allowed"),
])
def test_spec_values_are_refused_with_their_path(tmp_path, capsys, text, message):
    path = tmp_path / "job.yaml"
    path.write_text(text + "\n")
    with pytest.raises(SpecError, match=message):
        load_spec(path)
    code, err = timed_main(["validate", str(path)], capsys)
    assert code == 2


@pytest.mark.parametrize(("name", "content", "message"), [c for c in YAML_CASES if c[0] not in ("not-utf8", "list")],
                         ids=[c[0] for c in YAML_CASES if c[0] not in ("not-utf8", "list")])
def test_yaml_text_from_elsewhere_is_refused_alike(name, content, message):
    with pytest.raises(SpecError, match=message):
        parse_yaml(content.decode(), source="PRETRAIN_SPEC")


def test_interpolations_that_grow_geometrically_are_refused(tmp_path):
    lines = ["name: xxxxxxxxxx"] + [f"k{i}: " + ("${" + (f"k{i - 1}" if i else "name") + "}") * 10 for i in range(8)]
    (tmp_path / "job.yaml").write_text("\n".join(lines) + "\n")
    with pytest.raises(SpecError, match=r"k4: its interpolations expand to more than 1,048,576 characters"):
        load_spec(tmp_path / "job.yaml")


@pytest.mark.parametrize(("override", "message"), [
    ("optim.lr=.nan", r"optim.lr: got nan, expected a finite number"),
    ("model.n_layers=99999999999999999999999", r"model.n_layers: got 99999999999999999999999, must be ≤ 1024"),
    (f"name={nested(40)}", r"name: override value: nested deeper than 32 levels"),
    ("name=[&a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a], "
     + ", ".join(["[" + ", ".join(["*a"] * 10) + "]"] * 1100) + "]", r"name: override value: holds more than 10,000"),
    ("model=5", r"model: got 5, expected a section"),
    # how Python hands over an argument that was not UTF-8: its bytes as lone surrogates
    (os.fsdecode(b"name=caf\xe9"), r"name: override value: not UTF-8 text: byte 0xe9 at line 1, column 4"),
    ("a" + ".a" * 40 + "=1", r"is nested deeper than 32 levels"),
])
def test_hostile_overrides_are_refused(tmp_path, capsys, override, message):
    path = tmp_path / "job.yaml"
    path.write_text("model: {n_layers: 4}\n")
    code, err = timed_main(["validate", str(path), override], capsys)
    assert code == 2 and re.search(message, err), err


def test_sweep_refuses_non_finite_and_endless_numbers(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {n_layers: 2}\n")
    path = tmp_path / "sweep.yaml"
    path.write_text(f"base: base.yaml\nsizes: '{'9' * 5000}x2'\ntokens: 'nan, inf, 1e5'\n")
    with pytest.raises(SpecError) as info:
        load_sweep(path)
    assert [str(p) for p in info.value.problems] == [
        f"sizes: '{'9' * 5000}x2' is not dim x n_layers (e.g. 128x4)", "tokens: 'nan' is not a finite number",
        "tokens: 'inf' is not a finite number"]


# ---------------------------------------------------------------------------------------------- JSON files

JSON_CASES = [
    ("not-utf8", b'{"a": "caf\xe9"}', r"not UTF-8 text: byte 0xe9 at line 1, column 11"),
    ("empty", b"", r"the file is empty"),
    ("deep", nested(40).encode(), r"nested deeper than 32 levels"),
    ("very-deep", nested(200_000).encode(), r"nested deeper than 32 levels"),
    ("nan", b'{"seq_len": NaN}', r"NaN is not a number JSON allows here; every number must be finite"),
    ("infinity", b'{"seq_len": -Infinity}', r"-Infinity is not a number JSON allows here"),
    ("overflow", b'{"seq_len": 1e999}', r"1e999 is out of the range of a finite number"),
    ("huge-int", b'{"seq_len": ' + b"9" * 5000 + b"}", r"an integer of 5000 digits is out of every setting's range"),
    ("bad-json", b'{"seq_len": 1,}', r"not valid JSON at line 1, column 15"),
    ("list", b"[1, 2]", r"expected a JSON object, got list"),
]


def write(directory: Path, name: str, content: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(content)
    return directory


@pytest.mark.parametrize(("name", "content", "message"), JSON_CASES, ids=[c[0] for c in JSON_CASES])
def test_hostile_json_is_refused_by_every_reader(tmp_path, name, content, message):
    start = time.process_time()
    shards = write(tmp_path / "shards", "manifest.json", content)
    with pytest.raises(DataError, match=f"manifest.json: {message}"):
        read_manifest(shards)
    with pytest.raises(SpecError, match=f"data.path: cannot read {shards}/manifest.json: {message}"):
        load_spec(write(tmp_path, "job.yaml", f"data: {{path: {shards}}}\n".encode()) / "job.yaml")
    with pytest.raises(UserError, match=f"config.json: {message}"):
        read_hf_config(str(write(tmp_path / "hf", "config.json", content)))
    with pytest.raises(CheckpointError, match=f"layout.json: {message}"):
        read_layout(str(write(tmp_path / "step_1", "layout.json", content) / "layout.json"))
    assert time.process_time() - start < 4 * LIMIT_S  # four readers


@pytest.mark.parametrize(("name", "content", "message"), [c for c in JSON_CASES if c[0] != "list"],
                         ids=[c[0] for c in JSON_CASES if c[0] != "list"])
def test_json_bytes_from_an_object_store_are_refused_alike(name, content, message):
    with pytest.raises(CheckpointError, match=f"^s3://bucket/run/step_1/manifest.json: {message}"):
        loads_json(content, source="s3://bucket/run/step_1/manifest.json", error=CheckpointError)


def test_oversized_json_bytes_are_refused():
    with pytest.raises(SpecError, match=r"larger than 1,048,576 bytes"):
        loads_json(b" " * (CONFIG_BOUNDS.max_bytes + 1), source="layout.json")


def test_oversized_json_is_not_read_past_the_bound(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    with open(hf / "config.json", "wb") as f:
        f.truncate(CONFIG_BOUNDS.max_bytes + 1)
    with pytest.raises(UserError, match=r"config.json: larger than 1,048,576 bytes"):
        read_hf_config(str(hf))
    with open(tmp_path / "manifest.json", "wb") as f:
        f.truncate(WRITTEN_FILE_BOUNDS.max_bytes + 1)
    start = time.process_time()
    with pytest.raises(DataError, match=r"manifest.json: larger than 67,108,864 bytes"):
        read_manifest(tmp_path)
    assert time.process_time() - start < LIMIT_S


def test_hf_config_settings_of_the_wrong_type_are_named(tmp_path):
    config = {"model_type": "llama", "hidden_size": True, "num_hidden_layers": 10**30, "rms_norm_eps": "small",
              "rope_parameters": {"rope_theta": [1]}, "rope_scaling": "linear", "vocab_size": 32000}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=re.escape(
            "config.json: hidden_size=True: expected an integer from 1 to 16777216; num_hidden_layers=1" + "0" * 30
            + ": expected an integer from 1 to 16777216; rms_norm_eps='small': expected a number; "
            "rope_parameters.rope_theta=[1]: expected a number; rope_scaling='linear': expected an object")):
        read_hf_config(str(tmp_path))


@pytest.mark.parametrize(("layout", "message"), [
    ({"dp": 1, "pp": 1, "tp": 1, "zero_stage": 1, "step": 5, "backend": "megatron"},
     r"backend is 'megatron', expected one of 'deepspeed', 'native'"),
    ({"dp": 10**30, "pp": 1, "tp": 1, "zero_stage": 7, "step": 5},
     r"zero_stage is 7, expected one of 0, 1, 2, 3; dp is 10{30}, expected an integer from 1 to 65536"),
    ({"dp": 1, "pp": "1", "tp": 1, "zero_stage": 1, "step": -1},
     r"pp is '1', expected an integer from 1 to 1024; step is -1, expected an integer from 0 to 1000000000"),
])
def test_layout_values_are_checked(tmp_path, layout, message):
    (tmp_path / "layout.json").write_text(json.dumps(layout))
    with pytest.raises(CheckpointError, match=message):
        read_layout(str(tmp_path / "layout.json"))


def test_layout_of_an_older_checkpoint_reads(tmp_path):
    (tmp_path / "layout.json").write_text(json.dumps({"dp": 2, "pp": 1, "tp": 1, "zero_stage": 1, "step": 5}))
    assert read_layout(str(tmp_path / "layout.json"))["backend"] == "deepspeed"


@pytest.mark.parametrize(("name", "content", "message"),
                         [c for c in YAML_CASES if c[0] in ("not-utf8", "alias-bomb", "very-deep")],
                         ids=["not-utf8", "alias-bomb", "very-deep"])
def test_the_installed_command_prints_no_traceback(tmp_path, name, content, message):
    path = tmp_path / "job.yaml"
    path.write_bytes(content)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "validate", str(path)], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[0] == f"pretrain validate: {path}: 1 problem"
    assert re.search(message, done.stderr), done.stderr


# ---------------------------------------------------------------------------------------------- random input


def leaves(cls: type, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted path, type, metadata) of every leaf field, walked from the dataclasses themselves."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += leaves(hints[f.name], f"{prefix}{f.name}.")
        elif typing.get_origin(hints[f.name]) is not dict:
            out.append((f"{prefix}{f.name}", hints[f.name], f.metadata))
    return out


def sections(cls: type) -> list[str]:
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])]


def parses_as_finite(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


@pytest.mark.parametrize("cls", [JobSpec, PrepConfig, SourceConfig, SweepConfig])
def test_every_number_has_both_bounds_stated_in_its_help(cls):
    numbers = [(path, meta) for path, kind, meta in leaves(cls)
               if {int, float} & {kind, *typing.get_args(kind)} and "choices" not in meta]
    unbounded = [path for path, meta in numbers
                 if "min" not in meta or "max" not in meta or f"({meta['min']} to {meta['max']})" not in meta["help"]]
    assert numbers and unbounded == []


NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
STRUCTURES = st.one_of(st.lists(st.integers(-9, 9), min_size=1, max_size=3),
                       st.dictionaries(st.text("abc", min_size=1, max_size=3), st.integers(-9, 9), min_size=1,
                                       max_size=2))
HUGE = 10**40


def wrong_values(kind: Any, meta: Any) -> st.SearchStrategy:
    """Values the field must refuse: other types, non-finite numbers, numbers past its limits, unknown choices."""
    optional = type(None) in typing.get_args(kind)
    if optional:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    out = [STRUCTURES] + ([] if optional else [st.none()])
    if kind is int:
        out += [NON_FINITE, st.booleans(), st.text(max_size=6),
                st.floats(-1e6, 1e6).filter(lambda x: not x.is_integer())]
        if "min" in meta:
            out.append(st.integers(-HUGE, meta["min"] - 1))
        if "max" in meta:
            out.append(st.integers(meta["max"] + 1, HUGE))
        if "choices" in meta:
            out.append(st.integers(-HUGE, HUGE).filter(lambda x: x not in meta["choices"]))
    elif kind is float:
        out += [NON_FINITE, st.booleans(), st.text(max_size=6).filter(lambda t: not parses_as_finite(t))]
        if "min" in meta:
            out.append(st.floats(max_value=meta["min"], exclude_max=True, allow_infinity=False, allow_nan=False))
        if "max" in meta:
            out.append(st.floats(min_value=meta["max"], exclude_min=True, allow_infinity=False, allow_nan=False))
    elif kind is bool:
        out += [st.integers(-HUGE, HUGE), st.floats(allow_nan=False),
                st.text(max_size=6).filter(lambda t: t.lower() not in ("true", "false"))]
    else:
        out.append(st.booleans())
        if "choices" in meta:
            out.append(st.text(max_size=12).filter(lambda t: t not in meta["choices"]))
    aliases = meta.get("aliases", {})  # older spellings the field still takes
    return st.one_of(out).filter(lambda v: not (isinstance(v, (bool, str)) and str(v).lower() in aliases))


def field_and_wrong_value(cls: type, prefix: str = "") -> st.SearchStrategy:
    return st.sampled_from(leaves(cls, prefix)).flatmap(
        lambda leaf: st.tuples(st.just(leaf[0]), wrong_values(leaf[1], leaf[2])))


def nest(path: str, value: Any, into: dict | None = None) -> dict:
    out = {} if into is None else into
    *parents, last = path.split(".")
    node = out
    for name in parents:
        node = node.setdefault(name, {})
    node[last] = value
    return out


def flow(value: Any) -> str:
    """`value` as one line of YAML, as an override's right-hand side is written."""
    if isinstance(value, float) and not math.isfinite(value):
        return {"nan": ".nan", "inf": ".inf", "-inf": "-.inf"}[str(value)]
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).removesuffix("...\n").strip()


def refuses_with_path(argv: list[str], path: str, capsys) -> None:
    code, err = timed_main(argv, capsys)
    assert code == 2, err
    assert f"  {path}: " in err, err


RANDOM = settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))


@RANDOM
@given(case=field_and_wrong_value(JobSpec))
def test_every_spec_field_refuses_wrong_values(tmp_path_factory, capsys, case):
    path, value = case
    spec = tmp_path_factory.mktemp("spec") / "job.yaml"
    spec.write_text(yaml.safe_dump(nest(path, value)))
    refuses_with_path(["validate", str(spec)], path, capsys)


@RANDOM
@given(case=field_and_wrong_value(JobSpec))
def test_every_spec_field_refuses_wrong_overrides(tmp_path_factory, capsys, case):
    path, value = case
    spec = tmp_path_factory.mktemp("spec") / "job.yaml"
    spec.write_text("{}\n")
    refuses_with_path(["validate", str(spec), f"{path}={flow(value)}"], path, capsys)


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-HUGE, HUGE), st.floats(), st.text(max_size=8))
ANYTHING = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6), inner, max_size=3), max_leaves=12)


@RANDOM
@given(section=st.sampled_from(sections(JobSpec)),
       value=st.one_of(SCALARS, st.lists(ANYTHING, max_size=3)))
def test_every_section_refuses_what_is_not_a_mapping(tmp_path_factory, capsys, section, value):
    spec = tmp_path_factory.mktemp("spec") / "job.yaml"
    spec.write_text(yaml.safe_dump({section: value}))
    refuses_with_path(["validate", str(spec)], section, capsys)


@RANDOM
@given(path=st.sampled_from([p for p, _, _ in leaves(JobSpec)] + sections(JobSpec)), value=ANYTHING)
def test_any_structure_anywhere_ends_cleanly(tmp_path_factory, capsys, path, value):
    spec = tmp_path_factory.mktemp("spec") / "job.yaml"
    spec.write_text(yaml.safe_dump(nest(path, value)))
    code, err = timed_main(["validate", str(spec)], capsys)
    assert code == 0 or (code == 2 and err.startswith(f"pretrain validate: {spec}: ")), err


@RANDOM
@given(case=st.one_of(field_and_wrong_value(PrepConfig), field_and_wrong_value(SourceConfig, "sources.s.")))
def test_every_prep_field_refuses_wrong_values(tmp_path_factory, capsys, case):
    """Always with a problem besides the one drawn (no sources, or a source matching no file), so no run starts."""
    path, value = case
    directory = tmp_path_factory.mktemp("prep")
    raw = {"output": str(directory / "out")}
    if path.startswith("sources."):
        raw["sources"] = {"s": {"path": str(directory / "nothing-*.jsonl")}}
    config = directory / "prep.yaml"
    config.write_text(yaml.safe_dump(nest(path, value, raw)))
    refuses_with_path(["prep", str(config)], path, capsys)


@RANDOM
@given(case=st.one_of(field_and_wrong_value(PrepConfig), field_and_wrong_value(SourceConfig, "sources.s.")))
def test_every_prep_field_refuses_wrong_overrides(tmp_path_factory, capsys, case):
    path, value = case
    directory = tmp_path_factory.mktemp("prep")
    config = directory / "prep.yaml"
    config.write_text(yaml.safe_dump({"output": "out", "sources": {"s": {"path": "nothing-*.jsonl"}}}))
    refuses_with_path(["prep", str(config), f"{path}={flow(value)}"], path, capsys)


def test_an_argument_that_is_not_utf8_prints_no_traceback(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("{}\n")
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "validate", str(path), b"model.dim=\xff"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[1:] == [
        "  model.dim: override value: not UTF-8 text: byte 0xff at line 1, column 1"]
