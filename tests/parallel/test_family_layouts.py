"""The families' switches train under every layout of both engines exactly as in one process, eager and compiled.

Three models combine the switches that touch parallelism: a Qwen-like one (q/k/v biases, per-head query/key norms,
a sliding window shorter than the sequence, head_dim ≠ dim / n_heads, llama3-scaled RoPE), an OLMo 2-like one
(post-norm blocks, query/key norms over all heads) and a Gemma 2-like one (sandwich norms, GeGLU, soft-capped scores
and logits, scaled and tied embeddings, sliding windows on every other layer, its own attention scale and head_dim).
Each trains 3 steps under tp2 (with and without sequence parallelism), pp2 and dp2 (ZeRO-3) on the native engine
and tp2 (sequence parallel) and pp2 on the DeepSpeed engine; the four-rank layouts (dp2×tp2 and pp2×tp2 on each
engine) compose those same two-rank pieces, so each runs with one model, the models taking turns. Activation
checkpointing rotates through none, full and selective so that every model meets every mode. The 20 runs of two
ranks share one torchrun launch (`layout_worker.py --cases`), the 4 of four another (four ranks on two cores are the
slowest launch of the suite); each is held to the single-process reference with the layout tests' tolerances (1e-5
relative on losses, 1e-5 absolute on parameters).

Adam's eps is 1e-5 here (1e-6 in the other layout tests): in 3 steps a token first seen in the last step gets
Adam's first, normalised update, and with a near-zero gradient element the rounding noise of a different summation
order (sequence-parallel reduce-scatter) moved one embedding element by 2e-5 at 1e-6.

The native engine refuses tied embeddings with pp > 1 at validation, so the Gemma-like model runs untied there.

In one process: each model's blocks compile whole under checkpointing and train as eager ones, and selective
checkpointing recognises biased projections and soft-capped attention (from the FLOPs it recomputes). The engines
with parallel.compile=true (inductor) are left out of the suite, 3 minutes for the DeepSpeed layouts alone on 2
cores: run once, every layout matched the reference as above, but native tp2, whose compiled backward fails on CPU
torch 2.13 for every model.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils.flop_counter import FlopCounterMode

from orchestrator.validate import parse_spec
from parallel.activation_checkpoint import apply_activation_checkpointing
from parallel.compile import apply_compile
from parallel.model import build_model, cross_entropy
from tests.helpers import PARAM_ATOL, RTOL, assert_compiled_as_eager, launched_layouts, reference_run
from tests.parallel.layout_worker import TINY

MODELS = {
    "qwen": ["model.qkv_bias=true", "model.qk_norm=head", "model.sliding_window=8", "model.head_dim=24",
             "model.rope_scaling.type=llama3", "model.rope_scaling.factor=4",
             "model.rope_scaling.original_max_positions=8"],
    "olmo2": ["model.norm_placement=post", "model.qk_norm=full"],
    "gemma2": ["model.norm_placement=sandwich", "model.activation=gelu_tanh", "model.attn_softcap=20",
               "model.logit_softcap=10", "model.scale_embeddings=true", "model.sliding_window=8",
               "model.full_attention_every=2", "model.tie_embeddings=true", "model.attn_scale_dim=24",
               "model.head_dim=32"],
}
RUN = ["data.seq_len=16", "schedule.steps=3", "optim.eps=1e-5"]
NATIVE, DEEPSPEED = "parallel.backend=native", "parallel.backend=deepspeed"
PP2 = ["parallel.pp=2", "parallel.grad_accum=2"]
TP2_SP = ["parallel.tp=2", "parallel.sequence_parallel=true"]
# name → (ranks, the engine and its layout)
LAYOUTS = {
    "native-tp2": (2, [NATIVE, "parallel.tp=2"]),
    "native-tp2-sp": (2, [NATIVE, *TP2_SP]),
    "native-pp2": (2, [NATIVE, *PP2]),
    "native-dp2": (2, [NATIVE, "parallel.zero_stage=3"]),
    "deepspeed-tp2-sp": (2, [DEEPSPEED, *TP2_SP]),
    "deepspeed-pp2": (2, [DEEPSPEED, *PP2]),
    "native-dp2-tp2-sp": (4, [NATIVE, *TP2_SP, "parallel.zero_stage=3"]),
    "native-pp2-tp2": (4, [NATIVE, *PP2, "parallel.tp=2"]),
    "deepspeed-pp2-tp2-sp": (4, [DEEPSPEED, *PP2, *TP2_SP]),
    "deepspeed-dp2-tp2": (4, [DEEPSPEED, "parallel.tp=2", "parallel.zero_stage=1"]),
}
AC_MODES = ("none", "full", "selective")


def case_overrides() -> dict[str, tuple[int, list[str]]]:
    """Every model under every layout of two ranks; each layout of four ranks with one model, in turn."""
    four = [layout for layout, (ranks, _) in LAYOUTS.items() if ranks == 4]
    cases = {}
    for i, (model, switches) in enumerate(MODELS.items()):
        for j, (layout, (ranks, parallel)) in enumerate(LAYOUTS.items()):
            if ranks == 4 and four.index(layout) % len(MODELS) != i:
                continue
            untie = ["model.tie_embeddings=false"] if NATIVE in parallel and PP2[0] in parallel \
                and model == "gemma2" else []
            mode = f"parallel.activation_checkpointing={AC_MODES[(i + j) % len(AC_MODES)]}"
            cases[f"{model}-{layout}"] = ranks, [*RUN, *switches, *untie, *parallel, mode]
    return cases


CASES = case_overrides()
# LoRA adapters on the Qwen-like model's biased projections, through pipeline stages and split over tp beside its
# per-head query/key norms (whose DTensor plan makes new parameters, frozen again after it); the rest frozen. Adapters
# start at zero: a higher learning rate shows them learning in 3 steps.
LORA = ["model.lora.rank=4", "model.lora.alpha=8", "optim.lr=2e-2", "optim.min_lr=2e-3"]
CASES["qwen-native-pp2-lora"] = 2, [*RUN, *MODELS["qwen"], NATIVE, *PP2, *LORA]
CASES["qwen-native-tp2-lora"] = 2, [*RUN, *MODELS["qwen"], NATIVE, "parallel.tp=2", *LORA]
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("family-layouts")]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """case → its result: one torchrun launch for all the cases of that many ranks, on first use."""
    return launched_layouts(CASES, tmp_path_factory)


@pytest.fixture(scope="module")
def references() -> dict[tuple[str, ...], dict]:
    return {}


@pytest.mark.parametrize("case", list(CASES))
def test_family_trains_under_the_layout_as_in_one_process(case: str, results, references: dict) -> None:
    overrides = CASES[case][1]
    got = results(case)
    # The reference runs no engine, but a LoRA spec validates only with the native one.
    single = tuple(o for o in overrides if not o.startswith("parallel.") or (o == NATIVE and "lora" in case))
    if single not in references:
        references[single] = reference_run(list(single))
    expected = references[single]
    assert expected["losses"][-1] < expected["losses"][0], "the reference run should learn"
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(expected["losses"]), rtol=RTOL, atol=0)
    assert got["params"].keys() == expected["params"].keys()
    for name, value in expected["params"].items():
        torch.testing.assert_close(got["params"][name], value, rtol=0, atol=PARAM_ATOL,
                                   msg=lambda m, n=name: f"{n}: {m}")
    assert all(n > 0 for n in got["grad_norms"])


def tiny_model(model: str, mode: str, backend: object | None = None) -> torch.nn.Module:
    spec = parse_spec(TINY, overrides=[*RUN, *MODELS[model]])
    built = build_model(spec.model, "cpu")
    built.init_weights(seed=5)
    apply_activation_checkpointing(built.layers, mode)
    if backend is not None:
        apply_compile(built.layers, backend=backend)
    return built


def loss_and_grads(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    rows = torch.randint(0, TINY["model"]["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(3))
    loss = cross_entropy(model(rows[:, :-1]), rows[:, 1:])
    loss.backward()
    return loss.detach(), {n: q.grad.clone() for n, q in model.named_parameters()}


@pytest.mark.parametrize(("model", "mode"), zip(MODELS, ("selective", "full", "none"), strict=True))
def test_compiled_checkpointed_blocks_train_as_eager_ones(model: str, mode: str) -> None:
    """Compiled with dynamo and AOTAutograd's partitioner (`aot_eager_decomp_partition`, as
    test_activation_checkpoint.py), each model's blocks compile whole and give the eager gradients."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counter = CompileCounterWithBackend("aot_eager_decomp_partition")
    want = loss_and_grads(tiny_model(model, "none"))
    assert_compiled_as_eager(counter, loss_and_grads(tiny_model(model, mode, backend=counter)), want)


def backward_flops(model: torch.nn.Module) -> dict[str, int]:
    rows = torch.randint(0, TINY["model"]["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(3))
    loss = cross_entropy(model(rows[:, :-1]), rows[:, 1:])
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    return {str(op).split(".")[1]: n for op, n in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("model", ["qwen", "gemma2"])
def test_selective_checkpointing_recognises_biased_projections_and_eager_attention(model: str) -> None:
    """A biased projection is an addmm and soft-capped attention two bmms: selective keeps q and v (k is recomputed,
    the one addmm it runs again) and attention's output (only the scores are recomputed), as for an mm and SDPA."""
    dims = tiny_model(model, "none").dims
    plain, selective = backward_flops(tiny_model(model, "none")), backward_flops(tiny_model(model, "selective"))
    tokens, kv = 2 * 16, dims.n_kv_heads * dims.head_dim
    if dims.qkv_bias:
        assert selective["addmm"] - plain.get("addmm", 0) == dims.n_layers * 2 * tokens * dims.dim * kv
    if dims.attn_softcap:
        scores = 2 * tokens * 16 * dims.n_heads * dims.head_dim
        assert selective["bmm"] - plain["bmm"] == dims.n_layers * scores

