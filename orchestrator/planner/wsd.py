"""WSD branches: the loss of several token budgets from one stable-phase run plus a short decay for each.

    pretrain branch runs/long/checkpoints --steps 2000,4000,8000 [--decay-fraction 0.2] [-o runs/long-branches]

Under `schedule.lr_schedule: wsd` a run of B steps holds its learning rate until step K = B − round(f·B) and then
decays linearly to min_lr (`parallel.optim.lr_at`, f = `schedule.decay_fraction`). Up to step K it sees the learning
rates of any longer run still in its stable phase there, and the same batches (the loader's order is a function of
the seed and the position alone). So a branch starts from the stable run's checkpoint step_K and trains to
schedule.steps = B: weights, optimizer moments, RNG and loader position are restored exactly, and the resume takes
the learning rate from the branch's own schedule (`parallel.resume`), so it ends where a dedicated run of B steps
ends. Each branch has its own directory with the stable run's checkpoint hard-linked (copied across filesystems)
into it: the stable run is only read.

    <output>/b<B>/job.yaml                    the branch's job spec: the stable run's, steps B, wsd, its own dir
    <output>/b<B>/checkpoints/step_<K>/       the stable run's checkpoint it starts from
    <output>/b<B>/checkpoints/history.jsonl   its steps and evaluations
    <output>/results.jsonl                    one line per branch, in `pretrain sweep`'s results format
    <output>/branches.json, branches.png      the points, the fitted L(D) = E + B/D^β, the figure

Branches of a single-process run train here one after another, or as Ray tasks (`pretrain sweep`'s `train_one`);
those of a multi-rank run are prepared for `pretrain submit` and read back with `--fit-only`.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestrator.config_parser import WRITTEN_FILE_BOUNDS, load_json_lines
from orchestrator.errors import SpecError, UserError
from orchestrator.spec import JobSpec
from parallel import checkpoint_layout as names


@dataclass(frozen=True)
class Branch:
    """One budget: `budget` steps, starting after the stable run's step `start`."""

    budget: int
    start: int
    directory: Path
    spec: JobSpec

    @property
    def checkpoints(self) -> Path:
        return self.directory / "checkpoints"

    @property
    def job(self) -> Path:
        return self.directory / "job.yaml"


def parse_budgets(text: str) -> list[int]:
    """--steps: comma-separated step counts, each a positive integer, sorted and deduplicated."""
    budgets = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        if not item.isdigit() or int(item) < 1:
            raise UserError(f"--steps: {item!r} is not a positive whole number of steps (e.g. --steps 2000,4000,8000)")
        budgets.append(int(item))
    if not budgets:
        raise UserError("--steps: no budgets given; list the branches' schedule.steps, e.g. --steps 2000,4000,8000")
    return sorted(set(budgets))


def complete_steps(checkpoint_dir: Path) -> list[int]:
    """Steps of the complete checkpoints (step_<N>/ holding its manifest.json) in `checkpoint_dir`, oldest first."""
    steps = (names.step_of(entry.name) for entry in checkpoint_dir.iterdir())
    return sorted(s for s in steps if s is not None
                  and (checkpoint_dir / names.step_name(s) / names.MANIFEST_FILE).is_file())


def plan_branches(checkpoint_dir: str | os.PathLike, budgets: Sequence[int], output: str | os.PathLike, *,
                  decay_fraction: float | None = None, overrides: Sequence[str] = ()) -> list[Branch]:
    """Each budget as a branch of the stable run in `checkpoint_dir`; every budget the stable run cannot serve (its
    checkpoint missing, its learning rate not the branch's up to there) in one `UserError`."""
    from orchestrator.validate import load_spec, parse_spec, spec_to_dict
    from parallel.optim import lr_at, wsd_decay_start

    source = Path(checkpoint_dir).resolve()
    if "://" in os.fspath(checkpoint_dir) or not source.is_dir():
        raise UserError(f"{checkpoint_dir}: not a local directory; name the stable run's checkpoint.dir")
    out = Path(output).resolve()
    if out == source or source in out.parents:
        raise UserError(f"--output: {out} is inside the stable run's checkpoint directory {source}, which a branch "
                        "never writes to; choose another directory")
    steps = complete_steps(source)
    if not steps:
        raise UserError(f"{source}: no complete checkpoint (a step_<N>/ with {names.MANIFEST_FILE}); name the stable "
                        "run's checkpoint.dir")
    stable = load_spec(source / names.step_name(steps[-1]) / names.SPEC_FILE)
    fraction = stable.schedule.decay_fraction if decay_fraction is None else decay_fraction
    if not 0 < fraction < 1:
        raise UserError(f"--decay-fraction: {fraction} must be between 0 and 1 (the share of a branch spent decaying)")
    problems, branches = [], []
    for budget in budgets:
        start = wsd_decay_start(budget, fraction)
        directory = out / f"b{budget}"
        evaluate = [] if stable.schedule.eval_every else [f"schedule.eval_every={budget}"]  # at least at the end
        extra = [f"name={stable.name}-b{budget}", f"schedule.steps={budget}", "schedule.lr_schedule=wsd",
                 f"schedule.decay_fraction={fraction}", f"checkpoint.dir={directory / 'checkpoints'}",
                 "checkpoint.resume=true", *evaluate]
        try:
            spec = parse_spec(spec_to_dict(stable), source=f"branch b{budget}", overrides=[*extra, *overrides])
        except SpecError as e:
            problems.append(f"budget {budget}: " + "; ".join(str(p) for p in e.problems))
            continue
        if start < 1:
            problems.append(f"budget {budget}: with decay_fraction {fraction} it decays from its first step; there is "
                            "no stable phase to branch from")
            continue
        differ = next((s for s in range(start) if lr_at(s, stable.optim, stable.schedule)
                       != lr_at(s, spec.optim, spec.schedule)), None)
        if differ is not None:
            problems.append(
                f"budget {budget}: a dedicated run holds its learning rate until step {start}, but the stable run's "
                f"differs from step {differ + 1} ({lr_at(differ, stable.optim, stable.schedule):.4g} against "
                f"{lr_at(differ, spec.optim, spec.schedule):.4g}); the stable run must hold it that long "
                f"(schedule.lr_schedule wsd with more steps, or constant, and the same optim)")
            continue
        branches.append(Branch(budget=budget, start=start, directory=directory, spec=spec))
    missing = [b for b in branches if b.start not in steps]
    if missing:
        needed = [b.start for b in branches]
        every = math.gcd(*needed)
        problems.append(
            f"the branches start from the stable run's steps {', '.join(map(str, needed))} (decay_fraction "
            f"{fraction}); {source} has no complete checkpoint at step "
            f"{', '.join(str(b.start) for b in missing)} (it has {', '.join(map(str, steps))}). A stable run keeps "
            f"them with checkpoint.every={every} checkpoint.keep_every={every} ({every} divides every step needed): "
            "rerun the stable phase with them, or resume it with them for steps it has not reached")
    if problems:
        served = servable_budgets(stable, steps, fraction)
        problems.append(f"budgets its checkpoints serve as they are: {', '.join(map(str, served[:12]))}"
                        + (", ..." if len(served) > 12 else "") if served else
                        "none of its checkpoints is in its stable phase, so no budget can branch from it")
        raise UserError(f"cannot branch from {source}:\n  " + "\n  ".join(problems))
    return branches


def servable_budgets(stable: JobSpec, steps: Sequence[int], fraction: float) -> list[int]:
    """The budgets whose decay would start at one of `steps` while the stable run still holds its learning rate."""
    from parallel.optim import lr_at, wsd_decay_start

    held = dataclasses.replace(stable.schedule, lr_schedule="constant")
    decays = next((s for s in range(max(steps, default=0)) if lr_at(s, stable.optim, stable.schedule)
                   != lr_at(s, stable.optim, held)), math.inf)
    budgets = set()
    for step in (s for s in steps if s <= decays):
        # B − round(f·B) = step puts B·(1 − f) within half a step of `step`
        low, high = math.floor((step - 0.5) / (1 - fraction)), math.ceil((step + 0.5) / (1 - fraction))
        budgets |= {b for b in range(low - 1, high + 2) if b > step and wsd_decay_start(b, fraction) == step}
    return sorted(budgets)


def prepare(branch: Branch, checkpoint_dir: str | os.PathLike) -> None:
    """The branch's directory: its job.yaml and the stable run's step_<start> (hard links, else copies); a copy
    left unfinished by an earlier attempt is replaced, a finished one kept."""
    from orchestrator.validate import spec_to_dict

    name = names.step_name(branch.start)
    target = branch.checkpoints / name
    if not (target / names.MANIFEST_FILE).is_file():
        partial = branch.checkpoints / (name + names.PARTIAL_SUFFIX)
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(Path(checkpoint_dir) / name, partial, copy_function=_link_or_copy)
        partial.rename(target)
    branch.job.write_text(yaml.safe_dump(spec_to_dict(branch.spec), sort_keys=False), encoding="utf-8")


def _link_or_copy(source: str, target: str) -> None:
    """A hard link where both are on one filesystem (the files are never written again); a copy elsewhere."""
    try:
        os.link(source, target)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copy2(source, target)


def train_here(branches: Sequence[Branch], log=print) -> None:
    """Train the branches one after another in this process (single-process runs)."""
    from orchestrator.validate import load_spec
    from parallel import train
    from parallel.launch import RankEnv

    for branch in branches:
        spec = load_spec(branch.job, require_data=True)
        if spec.resources.device == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        log(f"branch b{branch.budget}: steps {branch.start + 1}-{branch.budget} from the stable run's step "
            f"{branch.start}")
        train.run(spec, RankEnv(master_port=0))  # one process: its own store, on any free port


def train_on_ray(branches: Sequence[Branch], address: str | None, cpus_per_run: float, gpus_per_run: int,
                 log=print) -> None:
    """Train the branches as Ray tasks, as many at once as the cluster holds (`pretrain sweep`'s runs)."""
    from cluster.local import apply_local_env, ray_cluster

    apply_local_env()
    import ray

    from orchestrator.planner.sweep import train_one

    with ray_cluster(address):
        task = ray.remote(train_one).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run)
        pending = {task.remote(str(b.job), []): b for b in branches}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            branch, outcome = pending.pop(ready[0]), ray.get(ready[0])
            log(f"branch b{branch.budget}: " + (f"FAILED\n{outcome['error']}" if "error" in outcome else "done"))


def result(branch: Branch) -> dict[str, Any] | None:
    """The branch's last step and evaluation from its history.jsonl, as a `pretrain sweep` result; None until it
    has trained its last step."""
    from orchestrator.planner.counting import count_params

    path = branch.checkpoints / "history.jsonl"
    if not path.exists():
        return None
    steps = {r["step"]: r for r in history(path, "step")}
    evals = {r["step"]: r for r in history(path, "eval")}
    if branch.budget not in steps:
        return None
    p, model = branch.spec.parallel, branch.spec.model
    return {"name": branch.spec.name, "params": count_params(model).total, "dim": model.dim,
            "n_layers": model.n_layers, "budget": branch.budget, "start_step": branch.start,
            "tokens": branch.budget * p.micro_batch_size * p.grad_accum * p.dp * branch.spec.data.seq_len,
            "val_loss": evals[branch.budget]["loss"] if branch.budget in evals else None,
            "train_loss": steps[branch.budget]["loss"],
            "seconds": sum(r.get("step_seconds", 0.0) for s, r in steps.items() if s > branch.start)}


def history(path: Path, kind: str) -> list[dict[str, Any]]:
    """The `kind` records ("step", "eval") of a history.jsonl, each with a number for step and loss (and tokens for a
    step); a line that is not JSON, or such a record without them, is a `UserError` naming the file and line."""
    def refused(why: str) -> UserError:
        return UserError(f"{why}; delete the line (or the branch's directory, to train it again)")

    needs = ("step", "loss", "tokens") if kind == "step" else ("step", "loss")
    records = []
    for number, record in load_json_lines(path, bounds=WRITTEN_FILE_BOUNDS, error=refused):
        if not isinstance(record, dict) or record.get("kind") != kind:
            continue
        if not all(isinstance(record.get(k), int | float) and not isinstance(record.get(k), bool) for k in needs):
            raise refused(f"{path}, line {number}: its {kind} record needs {', '.join(needs)} (numbers)")
        records.append(record)
    return records


def curve(path: Path, after: int = 0, log=print) -> tuple[list[float], list[float]]:
    """(training tokens, loss) of a history.jsonl's steps after `after`, for the figure: empty, with a line saying
    why, when there is none or it cannot be read."""
    try:
        records = [r for r in history(path, "step") if r["step"] > after] if path.exists() else []
    except UserError as e:
        log(f"the figure leaves out {path}: {e}")
        records = []
    return [r["step"] * r["tokens"] for r in records], [r["loss"] for r in records]


def summarize(branches: Sequence[Branch], checkpoint_dir: str | os.PathLike, output: str | os.PathLike,
              log=print) -> dict[str, Any]:
    """Each branch's final loss, L(D) fitted through them (three or more), results.jsonl, branches.json and
    branches.png in `output`; a branch not trained yet is a `UserError` naming it."""
    from orchestrator.planner.plot import plot_branches
    from orchestrator.planner.scaling import fit_token_law

    results = [result(b) for b in branches]
    untrained = [f"b{b.budget}" for b, r in zip(branches, results, strict=True) if r is None]
    if untrained:
        raise UserError(f"{output}: branch {', '.join(untrained)} has not trained its last step yet")
    measure = "val_loss" if all(r["val_loss"] is not None for r in results) else "train_loss"
    tokens, losses = [r["tokens"] for r in results], [r[measure] for r in results]
    law = fit_token_law(tokens, losses) if len(results) >= 3 else None
    out = Path(output)
    with open(out / "results.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in results)
    summary = {"stable": os.fspath(checkpoint_dir), "loss": measure, "params": results[0]["params"],
               "branches": results, "fit": None if law is None else asdict(law)}
    (out / "branches.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    plot_branches(out / "branches.png", curve(Path(checkpoint_dir) / "history.jsonl", log=log),
                  [curve(b.checkpoints / "history.jsonl", b.start, log) for b in branches], tokens, losses, law,
                  title=f"{branches[0].spec.name.rsplit('-b', 1)[0]}: {len(results)} WSD branches")
    what = "validation" if measure == "val_loss" else "training (no validation split)"
    log(f"{'steps':>8} {'from step':>10} {'tokens':>14} {what + ' loss':>16}")
    for r in results:
        log(f"{r['budget']:>8} {r['start_step']:>10} {r['tokens']:>14,} {r[measure]:>16.4f}")
    if law is not None:
        log(f"L(D) = {law.E:.4f} + {law.B:.4g}/D^{law.beta:.3f} at {results[0]['params'] / 1e6:.3g}M parameters")
    return summary
