"""Downstream task scores: lm-evaluation-harness runs over `parallel.lm_eval_adapter.PretrainLM`, for `pretrain eval`
and for the training loop's `eval` section.

In the loop every rank calls `Downstream.score` at the same steps with the live engine (no checkpoint round trip):
the harness builds the same requests on every rank, the adapter spreads them over the data-parallel ranks, and every
rank ends with the same scores. The harness seeds Python's, NumPy's and torch's global generators for its few-shot
sampling; their states are put back afterwards, so evaluating changes nothing the run draws next.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from orchestrator.spec import JobSpec
from parallel.callbacks import EvalStats
from parallel.eval_tasks import parse_task_names, task_manager


@dataclass(frozen=True)
class TaskSettings:
    """What to run: task names, documents per task (0: all), few-shot examples (None: each task's own)."""

    tasks: list[str]
    limit: int = 0
    num_fewshot: int | None = None
    include_path: str = ""


def run_tasks(lm: Any, settings: TaskSettings, manager: Any, log_samples: bool = False) -> dict[str, Any]:
    """The harness's results dictionary (`results`, `configs`, `versions`, ...) for `lm` on the tasks; with
    `log_samples`, every document's requests and responses under `samples`."""
    import lm_eval

    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Eager, even where the blocks are compiled: requests come in every length, and compiling the blocks for each
    # (training's own graphs are for one shape) cost a 1B run 20 s at its first evaluation on an H200, past
    # dynamo's recompile limit.
    with _global_rng_kept(), torch.compiler.set_stance("force_eager"):
        return lm_eval.simple_evaluate(
            model=lm, tasks=settings.tasks, num_fewshot=settings.num_fewshot, limit=settings.limit or None,
            task_manager=manager, bootstrap_iters=0, log_samples=log_samples)


def scores_of(results: dict[str, Any]) -> dict[str, float]:
    """{"task/metric": value} of every numeric metric (stderrs left out); a filter other than the harness's
    default "none" is kept as a suffix ("gsm8k/exact_match,strict-match")."""
    scores = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, comma, filtered = key.partition(",")
            if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)) \
                    or isinstance(value, bool):
                continue  # "alias", "sample_len": not metrics; stderrs: not scores
            name = metric if filtered == "none" else f"{metric},{filtered}"
            scores[f"{task}/{name}"] = float(value)
    return dict(sorted(scores.items()))


@contextlib.contextmanager
def _global_rng_kept() -> Iterator[None]:
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class Downstream:
    """The training loop's downstream evaluation: `spec.eval`'s tasks every `eval.every` (else
    `schedule.eval_every`) steps and at the last step, on the live engine."""

    def __init__(self, spec: JobSpec, engine: Any):
        from parallel.lm_eval_adapter import EngineModel, PretrainLM

        e = spec.eval
        self.settings = TaskSettings(parse_task_names(e.tasks, "eval.tasks"), e.limit, e.num_fewshot, e.include_path)
        self.manager = task_manager(self.settings.tasks, e.include_path, "eval.tasks")
        self.every = e.every or spec.schedule.eval_every
        self.last = spec.schedule.steps
        tokenizer = run_tokenizer(spec)
        self.lm = PretrainLM(EngineModel(engine), tokenizer.tokenizer_json, eos_id=tokenizer.eos_id,
                             max_length=spec.model.max_positions or spec.data.seq_len, batch_size=e.batch_size,
                             seed=spec.schedule.seed)

    def due(self, step: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == self.last)

    def score_into(self, evaluation: EvalStats) -> None:
        """This step's scores (the same on every rank) into `evaluation`, their time added to its seconds."""
        begin = time.perf_counter()
        evaluation.scores = scores_of(run_tasks(self.lm, self.settings, self.manager))
        evaluation.seconds += time.perf_counter() - begin


def build_downstream(spec: JobSpec, engine: Any) -> Downstream | None:
    """The loop's downstream evaluation, or None when `eval.tasks` names none; task names are checked here, before
    the first step."""
    return Downstream(spec, engine) if spec.eval.tasks.strip() else None


def run_tokenizer(spec: JobSpec) -> Any:
    """The run's tokenizer (`TokenizerFiles`: the shards' tokenizer.json and its eos id), refused when missing."""
    from orchestrator.errors import UserError
    from parallel.hf import shard_tokenizer

    found = shard_tokenizer(spec.data.path)
    if found is None or found.eos_id is None:
        raise UserError(f"eval.tasks: downstream evaluation needs the run's tokenizer.json and its end-of-text id "
                        f"in the shards' manifest ({spec.data.path})")
    return found


def load_weights(spec: JobSpec, engine: Any, step_dir: str) -> None:
    """The model weights of checkpoint `step_dir` (a step_<N> under `spec.checkpoint.dir`) in `engine`, whatever
    layout or backend wrote it; collective. In the layout it was written in, the engine reads its own files; in
    another, the weights are gathered once by the engine that wrote them (cached beside the checkpoints, as a
    resume across backends does) and scattered into this layout: evaluation has no use for optimizer state, which
    does not always map across layouts."""
    from parallel.checkpoint import Checkpointer
    from parallel.checkpoint_layout import layout_changes
    from parallel.consolidate import TorchWriter, consolidate, saved_layout
    from parallel.restore import load_engine, open_checkpoint

    checkpointer = Checkpointer(spec, engine.dims)
    name, layout = os.path.basename(step_dir), saved_layout(step_dir)
    if not layout_changes(layout, checkpointer.layout):
        load_engine(checkpointer, engine, open_checkpoint(checkpointer, name))
        return
    weights = checkpointer.make_once(name, f"weights-{layout['backend']}.pt", f"{layout['backend']} weights",
                                     lambda path: consolidate(spec, step_dir, TorchWriter(path)))
    engine.load_full_state_dict(torch.load(weights, weights_only=True))
