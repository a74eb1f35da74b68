"""parallel.activation_checkpointing: none, full, selective or every_n (with parallel.activation_checkpointing_every);
true and false from older specs still load."""

from __future__ import annotations

import subprocess
import sys

import pytest

from orchestrator.errors import SpecError
from orchestrator.validate import parse_spec, spec_to_dict


@pytest.mark.parametrize("mode", ["none", "full", "selective", "every_n"])
def test_each_mode_is_accepted_from_yaml_and_overrides(mode: str) -> None:
    assert parse_spec({"parallel": {"activation_checkpointing": mode}}).parallel.activation_checkpointing == mode
    overridden = parse_spec({}, overrides=[f"parallel.activation_checkpointing={mode}"])
    assert overridden.parallel.activation_checkpointing == mode


@pytest.mark.parametrize(("old", "new"), [(True, "full"), (False, "none"), ("true", "full"), ("False", "none")])
def test_an_older_specs_boolean_means_full_or_none(old: object, new: str) -> None:
    spec = parse_spec({"parallel": {"activation_checkpointing": old}})
    assert spec.parallel.activation_checkpointing == new
    # The resolved spec (what checkpoints and logs keep) says the new name.
    assert spec_to_dict(spec)["parallel"]["activation_checkpointing"] == new
    assert parse_spec({}, overrides=[f"parallel.activation_checkpointing={old}"]).parallel.activation_checkpointing \
        == new


def test_the_default_is_none() -> None:
    assert parse_spec({}).parallel.activation_checkpointing == "none"


@pytest.mark.parametrize("bad", ["partial", 1, "yes"])
def test_anything_else_is_refused_naming_the_allowed_modes(bad: object) -> None:
    with pytest.raises(SpecError, match=r"parallel\.activation_checkpointing: got .*, allowed: 'none', 'full', "
                                        r"'selective', 'every_n'"):
        parse_spec({"parallel": {"activation_checkpointing": bad}})


def test_the_cli_refuses_an_unknown_mode_with_exit_code_2(tmp_path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("parallel: {activation_checkpointing: some}\n")
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "validate", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert ("parallel.activation_checkpointing: got 'some', allowed: 'none', 'full', 'selective', 'every_n'"
            in done.stderr)


def test_every_n_takes_its_n_from_overrides_and_defaults_to_2() -> None:
    assert parse_spec({"parallel": {"activation_checkpointing": "every_n"}}).parallel.activation_checkpointing_every \
        == 2
    spec = parse_spec({"model": {"n_layers": 8}}, overrides=["parallel.activation_checkpointing=every_n",
                                                             "parallel.activation_checkpointing_every=4"])
    assert (spec.parallel.activation_checkpointing, spec.parallel.activation_checkpointing_every) == ("every_n", 4)


@pytest.mark.parametrize("bad", [0, -2, 1025, "two"])
def test_an_every_outside_its_bounds_is_refused_naming_the_field(bad: object) -> None:
    with pytest.raises(SpecError, match=r"parallel\.activation_checkpointing_every: got .*"):
        parse_spec({"parallel": {"activation_checkpointing": "every_n", "activation_checkpointing_every": bad}})


def test_every_n_past_the_last_layer_is_refused_as_checkpointing_nothing() -> None:
    spec = {"model": {"n_layers": 4}, "parallel": {"activation_checkpointing": "every_n"}}
    assert parse_spec({**spec, "parallel": {**spec["parallel"], "activation_checkpointing_every": 4}})
    with pytest.raises(SpecError, match=r"parallel\.activation_checkpointing_every: 5 with activation_checkpointing="
                                        r"every_n checkpoints no block of model\.n_layers=4; allowed: 1 to 4"):
        parse_spec({**spec, "parallel": {**spec["parallel"], "activation_checkpointing_every": 5}})
    # The same n is no contradiction when nothing is checkpointed every n-th block.
    assert parse_spec({"model": {"n_layers": 4}, "parallel": {"activation_checkpointing_every": 5}})


def test_every_n_past_one_pipeline_stage_is_allowed() -> None:
    spec = parse_spec({"model": {"n_layers": 4}, "resources": {"gpus_per_node": 2},
                       "parallel": {"pp": 2, "grad_accum": 2, "activation_checkpointing": "every_n",
                                    "activation_checkpointing_every": 3}})
    assert spec.parallel.activation_checkpointing_every == 3


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_offload_is_accepted_with_full_or_selective_checkpointing_on_the_native_backend(mode: str) -> None:
    spec = parse_spec({}, overrides=["parallel.activation_offload=true", f"parallel.activation_checkpointing={mode}",
                                     "parallel.backend=native"])
    assert (spec.parallel.activation_offload, spec.parallel.activation_checkpointing) == (True, mode)


@pytest.mark.parametrize(("overrides", "message"), [
    *[([f"parallel.activation_checkpointing={mode}"],
       r"parallel\.activation_offload: moves what the blocks keep of the residual stream, little under full and "
       r"selective checkpointing and more than PCIe carries without; set activation_checkpointing=full or selective "
       rf"\(it is {mode}\)")
      for mode in ("none", "every_n")],
    (["parallel.activation_checkpointing=full", "parallel.backend=deepspeed"],
     r"parallel\.activation_offload: needs parallel\.backend=native"),
    (["parallel.activation_checkpointing=full", "parallel.pp=2", "parallel.grad_accum=2", "resources.gpus_per_node=2"],
     r"parallel\.activation_offload: is not supported with parallel\.pp=2"),
])
def test_activation_offload_where_it_cannot_run_is_refused_naming_the_field(overrides: list[str],
                                                                              message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec({}, overrides=["parallel.activation_offload=true", *overrides])
