"""FP8 training (torchao's float8 linear layers, emulated GEMMs on the CPU) keeps the layout guarantees.

Every layout of a float8 run trains like the one-process float8 run, and float8 really is in the matmuls: the
losses stay near the fp32 run's but are not its. Not to fp32's last bits: a cast to float8 turns a last-bit
difference of summation order (pipeline micro-batches, sharded gradients) into a whole float8 step now and then, so
the losses agree to 0.1%. Tensorwise also scales activations by the largest value in the micro-batch a rank holds,
and data parallelism halves that micro-batch: there the losses agree to 0.5%, which still catches a wrong scale in
FSDP's float8 all-gather of the weights (and Adam turns such differences into whole steps of some weights, so the
parameters themselves are not compared).
Refusals are checked where the spec is validated.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from orchestrator.errors import SpecError
from orchestrator.validate import parse_spec
from parallel.callbacks import device_peak_flops, mixed_peak_flops
from parallel.float8 import float8_flops_per_token
from parallel.model import ModelDims, build_model
from parallel.parallel_dims import ParallelDims
from parallel.parallelize import parallelize_model
from tests.helpers import cached_reference, launched_layouts
from tests.parallel.layout_worker import TINY

NATIVE = ["parallel.backend=native"]
PP2 = ["parallel.pp=2", "parallel.grad_accum=2"]
# recipe → [(processes, overrides, relative tolerance of the losses)]: the first is the one-process reference
LAYOUTS = {
    "tensorwise": [(1, [], 0), (2, ["parallel.zero_stage=3"], 5e-3)],
    "rowwise": [(1, [], 0), (2, PP2, 1e-3)],
}

pytestmark = pytest.mark.xdist_group("float8")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Callable[[str], dict]:
    """Both recipes' runs of one process count share one torchrun launch."""
    cases = {f"{recipe}-{i}": (procs, [*NATIVE, f"parallel.float8={recipe}", *extra])
             for recipe, layouts in LAYOUTS.items() for i, (procs, extra, _) in enumerate(layouts)}
    return launched_layouts(cases, tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(LAYOUTS))
def test_float8_layouts_match_one_process_and_stay_near_full_precision(recipe: str, results) -> None:
    runs = [results(f"{recipe}-{i}") for i in range(len(LAYOUTS[recipe]))]
    one, others = runs[0], runs[1:]
    for (procs, extra, rtol), got in zip(LAYOUTS[recipe][1:], others, strict=True):
        where = f"{procs} processes {extra}"
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(one["losses"]), rtol=rtol, atol=0,
                                   msg=lambda m, w=where: f"{w}: {m}")
        assert got["params"].keys() == one["params"].keys()
        assert got["eval_loss"] == pytest.approx(one["eval_loss"], rel=rtol), where

    full = cached_reference(())["losses"]
    fp8 = one["losses"]
    assert fp8[-1] < fp8[0] - 0.1, "the float8 run learns"
    gaps = [abs(a - b) / b for a, b in zip(fp8, full, strict=True)]
    assert max(gaps) < 0.03, f"float8 strays from fp32 by {max(gaps):.2%}"
    assert max(gaps) > 1e-6, "float8 gave the fp32 losses exactly: the matmuls were not converted"


def test_only_block_linears_with_sides_of_16_are_converted() -> None:
    from torchao.float8.float8_linear import Float8Linear

    spec = parse_spec(TINY, overrides=[*NATIVE, "parallel.float8=rowwise", "model.vocab_size=130"])
    model = build_model(spec.model)
    parallelize_model(model, ParallelDims.from_spec(spec, 1, 0), spec, _native(), torch.device("cpu"))
    converted = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert "lm_head" in linears - converted
    assert {n.rsplit(".", 1)[-1] for n in converted} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"}
    assert len(converted) == 7 * spec.model.n_layers


def test_float8_flops_are_six_times_the_weights_converted() -> None:
    """The float8 share of MFU's FLOPs counts exactly the weights torchao converts: ffn_dim 200 (not a multiple of
    16) leaves the MLP in bf16, and the count follows."""
    from torchao.float8.float8_linear import Float8Linear

    for ffn in (None, 200):
        spec = parse_spec(TINY, overrides=[*NATIVE, "parallel.float8=tensorwise", f"model.ffn_dim={ffn or 'null'}"])
        model = build_model(spec.model)
        parallelize_model(model, ParallelDims.from_spec(spec, 1, 0), spec, _native(), torch.device("cpu"))
        converted = sum(m.weight.numel() for m in model.modules() if isinstance(m, Float8Linear))
        dims = ModelDims.from_config(spec.model)
        assert float8_flops_per_token(dims) == 6 * converted > 0
        assert float8_flops_per_token(dims) < dims.flops_per_token(spec.data.seq_len)


def test_a_float8_runs_peak_blends_the_two_precisions_peaks() -> None:
    assert mixed_peak_flops(989e12, 1979e12, 0.0) == 989e12
    assert mixed_peak_flops(989e12, 1979e12, 1.0) == pytest.approx(1979e12)
    # Three quarters of the FLOPs at twice the rate take 3/8 of the time they would in bf16, the rest 1/4.
    assert mixed_peak_flops(1.0, 2.0, 0.75) == pytest.approx(1 / (0.25 + 0.375))
    assert device_peak_flops("cuda", 989e12, 0.5, 1979e12) == pytest.approx(1 / (0.5 / 989e12 + 0.5 / 1979e12))
    assert device_peak_flops("cpu", 989e12, 0.5, 1979e12) is None


@pytest.mark.parametrize("overrides,message", [
    (["parallel.backend=deepspeed"], r"parallel.float8: tensorwise needs parallel.backend=native"),
    ([*NATIVE, "parallel.tp=2", "resources.gpus_per_node=2"],
     r"parallel.float8: tensorwise with parallel.tp=2 is not supported"),
])
def test_float8_where_it_cannot_run_is_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec(TINY, overrides=["parallel.float8=tensorwise", *overrides])


def test_a_float8_typo_names_the_choices() -> None:
    with pytest.raises(SpecError, match=r"parallel.float8.*tensorwise.*rowwise"):
        parse_spec(TINY, overrides=[*NATIVE, "parallel.float8=e4m3"])


def _native():
    from parallel.native_engine import TECHNIQUES

    return TECHNIQUES
