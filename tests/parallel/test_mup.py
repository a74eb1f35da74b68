"""μP (`model.parametrization: mup`): the per-layer scales, the optimizer groups that carry the learning-rate
multipliers, export to transformers as an ordinary model, the layouts of both engines against one process, and the
specs it refuses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers as tf

from orchestrator.cli import main as pretrain
from orchestrator.errors import SpecError
from orchestrator.spec import ModelConfig
from orchestrator.validate import parse_spec
from parallel.hf import HFExport, save_hf
from parallel.model import build_model
from parallel.mup import is_hidden_matrix
from parallel.optim import build_optimizer, build_param_groups, build_scheduler
from tests.helpers import PARAM_ATOL, RTOL, reference_run, run_layout
from tests.parallel.layout_worker import TINY

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/parallel/conftest.py

MUP = ["model.parametrization=mup", "model.mup_base_dim=32"]


def model(dim: int, mup: bool, **changes):
    config = ModelConfig(vocab_size=96, dim=dim, n_layers=2, n_heads=dim // 16, multiple_of=32, init_std=0.2,
                         parametrization="mup" if mup else "standard", mup_base_dim=32 if mup else 0, **changes)
    built = build_model(config, "cpu")
    built.init_weights(seed=3)
    return built


def test_hidden_matrices_scale_with_width_and_the_rest_does_not() -> None:
    """Init std of a hidden matrix ∝ sqrt(base/dim), the embedding's and lm_head's constant; logits × base/dim;
    attention 1/head_dim. At the base width μP's weights are the standard model's."""
    base, wide = model(32, mup=True), model(128, mup=True)
    assert torch.equal(base.layers[0].mlp.up_proj.weight, model(32, mup=False).layers[0].mlp.up_proj.weight)
    std = {name: param.std().item() for name, param in wide.named_parameters()}
    assert std["layers.0.mlp.up_proj.weight"] == pytest.approx(0.2 * math.sqrt(32 / 128), rel=0.05)
    assert std["embed_tokens.weight"] == pytest.approx(0.2, rel=0.05)
    assert std["lm_head.weight"] == pytest.approx(0.2, rel=0.05)
    assert wide.layers[0].self_attn.scale == 1 / 16 and model(128, mup=False).layers[0].self_attn.scale is None
    h = torch.randn(2, 5, 128)
    torch.testing.assert_close(wide.head(h), wide.lm_head(wide.norm(h)) * (32 / 128))


def test_optimizer_groups_scale_the_hidden_matrices_learning_rate_under_the_schedule() -> None:
    spec = parse_spec(TINY, overrides=["model.dim=128", "model.n_heads=8", *MUP])
    wide = build_model(spec.model, "cpu")
    groups = build_param_groups(wide.named_parameters(), 0.1, hidden_lr_scale=32 / 128)
    hidden = {id(q) for n, q in wide.named_parameters() if is_hidden_matrix(n, q.ndim)}
    assert {id(q) for q in groups[-1]["params"]} == hidden and len(hidden) == 7 * spec.model.n_layers
    optimizer = build_optimizer(groups, spec.optim, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, spec.optim, spec.schedule)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    lrs = [group["lr"] for group in optimizer.param_groups]
    assert lrs[0] == lrs[1] > 0 and lrs[-1] == pytest.approx(lrs[0] * 32 / 128)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.1, 0.1]


@pytest.mark.parametrize(("family", "changes"), [("llama", {}), ("qwen3", {"qk_norm": "head"}),
                                                 ("qwen2", {"qkv_bias": True})])
def test_export_gives_transformers_the_same_logits(family: str, changes: dict, tmp_path: Path) -> None:
    """The output multiplier folds into lm_head and the attention scale into the queries (their norm when there is
    one): LlamaForCausalLM (or Qwen's) computes our logits from ordinary weights and an ordinary config."""
    ours = model(128, mup=True, **changes)
    with torch.no_grad():  # norms and biases away from their initial 1 and 0, so a misplaced fold shows
        for param in ours.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.3)
    x = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    save_hf(str(tmp_path), ours.state_dict(), ours.dims, HFExport(family=family))
    config = json.loads((tmp_path / "config.json").read_text())
    assert "query_pre_attn_scalar" not in config and config["tie_word_embeddings"] is False
    exported = tf.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = ours(x)
        assert expected.std() > 0.3  # not flat: a wrong scale shows
        torch.testing.assert_close(exported(x).logits, expected, rtol=0, atol=1e-4)


RUN = ["data.seq_len=16", "schedule.steps=3", "optim.eps=1e-5", *MUP]
NATIVE, DEEPSPEED = "parallel.backend=native", "parallel.backend=deepspeed"
PP2 = ["parallel.pp=2", "parallel.grad_accum=2"]
LAYOUTS = {
    "native-tp2": [NATIVE, "parallel.tp=2"],
    "native-pp2": [NATIVE, *PP2],
    "deepspeed-tp2-sp": [DEEPSPEED, "parallel.tp=2", "parallel.sequence_parallel=true"],
    "deepspeed-pp2": [DEEPSPEED, *PP2],
}


@pytest.mark.slow
@pytest.mark.xdist_group("mup-layouts")
def test_mup_trains_under_tp2_and_pp2_of_both_engines_as_in_one_process(tmp_path: Path) -> None:
    """One torchrun launch of two ranks runs the four layouts; each is held to the single-process reference with
    the layout tests' tolerances. The reference's hidden matrices train at a quarter of the embedding's rate."""
    cases = {name: [*RUN, *layout] for name, layout in LAYOUTS.items()}
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    results = run_layout(2, ["--cases", str(tmp_path / "cases.json")], tmp_path / "results.pt", tmp_path)
    expected = reference_run(RUN)
    assert expected["losses"][-1] < expected["losses"][0], "the reference run should learn"
    for name in LAYOUTS:
        got = results[name]
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(expected["losses"]), rtol=RTOL, atol=0,
                                   msg=lambda m, n=name: f"{n}: {m}")
        for param, value in expected["params"].items():
            torch.testing.assert_close(got["params"][param], value, rtol=0, atol=PARAM_ATOL,
                                       msg=lambda m, n=f"{name} {param}": f"{n}: {m}")
        assert got["lrs"][0] > 0


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.parametrization=mup"], r"model.mup_base_dim: must be set with model.parametrization=mup"),
    ([*MUP, "model.tie_embeddings=true"], r"model.tie_embeddings: must be false with model.parametrization=mup"),
    ([*MUP, "model.scale_embeddings=true"], r"model.scale_embeddings: must be false with"),
    ([*MUP, "model.attn_scale_dim=24"], r"model.attn_scale_dim: must be null with .*1/head_dim"),
    ([*MUP, "checkpoint.init_from=some/hf"], r"checkpoint.init_from: cannot be used with model.parametrization=mup"),
    (["model.mup_base_dim=64"], r"model.mup_base_dim: 64 is only read with model.parametrization=mup"),
    (["model.parametrization=mu-p"], r"model.parametrization: got 'mu-p', allowed: 'standard', 'mup'"),
])
def test_wrong_combinations_are_refused_naming_the_field(overrides: list[str], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec(TINY, overrides=overrides)


def test_validate_command_refuses_with_exit_2(tmp_path: Path, capsys) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("model: {parametrization: mup, mup_base_dim: 64, tie_embeddings: true}\n")
    assert pretrain(["validate", str(spec)]) == 2
    assert "model.tie_embeddings: must be false with model.parametrization=mup" in capsys.readouterr().err
    assert pretrain(["validate", str(spec), "model.tie_embeddings=false"]) == 0
