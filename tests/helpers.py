"""Helpers the test modules share: free ports, torchrun launches of `pretrain train`, the tiny model, the
layout-equivalence check (a layout run under torchrun against the single-process definition of the step), and
transformers' loss on the loader's batches."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from orchestrator.spec import ModelConfig
from orchestrator.validate import parse_spec
from parallel.lora import apply_lora, freeze_base
from parallel.materialize import materialize_model
from parallel.model import build_model, cross_entropy
from parallel.moe import moe_state, update_expert_bias
from parallel.mup import hidden_lr_scale
from parallel.optim import build_optimizer, build_param_groups, build_scheduler
from tests.parallel.layout_worker import TINY, row_documents, spec_tokens

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "parallel" / "layout_worker.py"
RTOL = 1e-5
PARAM_ATOL = 1e-5


def torchrun(procs: int) -> list[str]:
    """torchrun on this machine alone; its agent binds the rendezvous port itself (a port found free beforehand can be
    taken by another test's process before torchrun binds it)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]


TINY_RUN = ["model.dim=64", "model.n_layers=2", "data.seq_len=64", "parallel.micro_batch_size=4",
            "parallel.grad_accum=2", "schedule.warmup_steps=2", "schedule.eval_every=4", "schedule.eval_batches=2",
            "schedule.log_every=1", "checkpoint.every=4", "checkpoint.async_save=false"]


def pretrain_train(procs: int, tmp: Path, *overrides: str,
                   program: tuple[str, ...] = ("-m", "orchestrator.cli", "train")) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "TMPDIR": str(tmp),
           "PYTHONPATH": str(REPO)}
    cmd = [*torchrun(procs), *program, str(REPO / "examples" / "tiny.yaml"), *TINY_RUN, *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp)


def losses(output: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in re.findall(r"step +(\d+) \| loss ([\d.]+)", output)}


CONFIG = ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32)


def tiny(tie: bool = False):
    config = ModelConfig(**{**CONFIG.__dict__, "tie_embeddings": tie})
    model = build_model(config)
    materialize_model(model, seed=3, device=torch.device("cpu"))
    return model


def run_layout(procs: int, overrides: list[str], out: Path, tmp: Path, worker: Path = WORKER) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "TMPDIR": str(tmp),
           "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    cmd = [*torchrun(procs), str(worker), str(out), *overrides]
    # within the suite's 600 s a test, which counts this launch: 12 four-rank cases took 321 s on a loaded 2-core CPU
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    failed = Path(f"{out}.error")
    # torchrun's own log names a rank that died without a Python error (a signal), which the file cannot.
    assert not failed.exists(), failed.read_text() + "\n--- torchrun ---\n" + result.stderr[-3000:]
    assert result.returncode == 0 and out.exists(), result.stdout[-3000:] + result.stderr[-6000:]
    return torch.load(out, weights_only=False)


def reference_run(overrides: list[str]) -> dict:
    """The training step by definition: one process, the whole global batch, torch AdamW, clip, schedule."""
    spec = parse_spec(TINY, overrides=overrides)
    model = build_model(spec.model)
    if spec.model.lora.rank:
        apply_lora(model, spec.model.lora, spec.checkpoint.init_from)
        freeze_base(model)
    materialize_model(model, spec.schedule.seed, torch.device("cpu"))
    groups = build_param_groups(model.named_parameters(), spec.optim.weight_decay, hidden_lr_scale(model.dims))
    optimizer = build_optimizer(groups, spec.optim, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, spec.optim, spec.schedule)
    tokens = spec_tokens(spec)
    losses = []
    for rows in tokens:
        loss = cross_entropy(model(rows[:, :-1], documents=row_documents(rows, spec)), rows[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        update_expert_bias(model, None)
        losses.append(loss.item())
    state = {**dict(model.named_parameters()), **moe_state(model)}
    return {"losses": losses, "params": {n: p.detach() for n, p in state.items()}}


@functools.cache
def cached_reference(overrides: tuple[str, ...]) -> dict:
    """`reference_run` of these overrides, once per test process."""
    return reference_run(list(overrides))


def hold_to_reference(name: str, losses: list[float], params: dict, overrides: list[str], start: int = 0) -> None:
    """A layout run's losses (of the steps from `start` on) and final parameters held to the single-process
    reference of its model, schedule and backend, with the layout tests' tolerances."""
    expected = cached_reference(tuple(o for o in overrides if o.startswith(("model.", "schedule.",
                                                                             "parallel.backend"))))
    assert expected["losses"][-1] < expected["losses"][0] - 0.1, "the reference run should learn something"
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected["losses"][start:]), rtol=RTOL, atol=0,
                               msg=lambda m: f"{name} losses: {m}")
    assert params.keys() == expected["params"].keys()
    for param, value in expected["params"].items():
        torch.testing.assert_close(params[param], value, rtol=0, atol=PARAM_ATOL,
                                   msg=lambda m, n=param: f"{name} {n}: {m}")


def assert_compiled_as_eager(counter, got: tuple[torch.Tensor, dict], want: tuple[torch.Tensor, dict]) -> None:
    """A compiled model's (loss, gradients) against the eager model's: `counter` (a dynamo CompileCounter) compiled
    some block, with no graph break, and the numbers agree (gradients within 1e-5). Resets dynamo."""
    assert counter.frame_count >= 1, "no block was compiled"
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    torch._dynamo.reset()
    torch.testing.assert_close(got[0], want[0], rtol=RTOL, atol=0)
    for name, grad in want[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def launched_layouts(cases: dict[str, tuple[int, list[str]]], tmp_path_factory) -> Callable[[str], dict]:
    """name → its run's result: every case of one process count runs in one torchrun launch, on first use."""
    launched: dict[int, dict[str, dict]] = {}

    def of(name: str) -> dict:
        procs = cases[name][0]
        if procs not in launched:
            tmp = tmp_path_factory.mktemp(f"layouts-{procs}")
            mine = {case: overrides for case, (n, overrides) in cases.items() if n == procs}
            (tmp / "cases.json").write_text(json.dumps(mine))
            launched[procs] = run_layout(procs, ["--cases", str(tmp / "cases.json")], tmp / "result.pt", tmp)
        return launched[procs][name]

    return of


def assert_matches_single_process(name: str, got: dict, overrides: list[str]) -> None:
    """A layout's losses, parameters, schedule and eval loss held to the single-process reference."""
    hold_to_reference(name, got["losses"], got["params"], overrides)
    assert len(got["lrs"]) == 10 and got["lrs"][0] < got["lrs"][2]
    assert all(n > 0 for n in got["grad_norms"])
    assert got["eval_loss"] < got["losses"][0] - 0.1, "eval of the first batch sees the trained weights"


def hf_loss(model: torch.nn.Module, micro_batches) -> float:
    """A transformers model's mean loss over `parallel.loader` micro-batches: what a train step reports."""
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(model(mb.inputs).logits.flatten(0, 1), mb.targets.flatten())
                  for mb in micro_batches]
    return float(torch.stack(losses).mean())
