"""A scaling sweep: a grid of model sizes × token budgets trained as small runs on Ray, then the law fitted.

    pretrain sweep examples/sweep-demo.yaml [key=value ...] [--address ray://head:10001]

Every run is one single-process training through the real loop (`parallel.train.run`), in a Ray task holding
`cpus_per_run` CPUs (or one GPU), so the cluster runs as many at once as it holds. The task trains in a child process
(`python -m orchestrator.planner.sweep`): DeepSpeed and torch.distributed keep process-wide state that must not leak
into the Ray worker or the next run. A failed run is reported with the end of its output and left for a rerun.
Each finished run appends a line to `results.jsonl`, and a rerun skips the runs already there; then the law
L(N, D) = E + A/N^α + B/D^β is fitted (`scaling.fit_scaling_law`) and written to `fit.json` with the IsoFLOP minima,
the compute-optimal frontier and the predicted loss of a target run, and drawn to `scaling.png`.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config_parser import load_json_lines, load_yaml, parse_config, setting
from orchestrator.errors import Problem, SpecError, UserError
from orchestrator.planner.transfer import TransferConfig, transfer_grid

EMPTY_SWEEP = "a sweep config needs at least `base`, the job spec the runs start from (e.g. base: tiny.yaml)"


@dataclass
class SweepConfig:
    """What `pretrain sweep` reads; paths are relative to the sweep file."""

    name: str = setting("sweep", "sweep name: the runs' name prefix")
    base: str = setting("", "job spec the runs start from (optimizer, precision, engine)")
    data: str = setting("", "shard directory written by `pretrain prep`; empty: the base spec's data.path")
    output: str = setting("runs/sweep", "directory for results.jsonl, fit.json and scaling.png")
    sizes: str = setting("64x2, 96x3, 128x4, 192x4", "model sizes, comma-separated dim x n_layers")
    head_dim: int = setting(32, "attention head size: n_heads = dim / head_dim", min=2, max=4096)
    tokens: str = setting("1e5, 2e5, 4e5", "training tokens of each run, comma-separated")
    batch_size: int = setting(16, "sequences per optimizer step", min=1, max=65536)
    seq_len: int = setting(128, "tokens per sequence", min=8, max=2**20)
    warmup_fraction: float = setting(0.1, "share of each run's steps spent warming up", min=0.0, max=1.0)
    eval_batches: int = setting(16, "validation batches measured at the end of each run", min=1,
                                max=1_000_000)
    cpus_per_run: float = setting(1.0, "CPUs a run holds on the cluster (fractions allowed)", min=0.01,
                                 max=1024.0)
    gpus_per_run: int = setting(0, "GPUs a run holds (0: CPU runs)", min=0, max=1)
    target_params: float = setting(0.0, "predict the loss of a run with this many parameters (0: none)",
                                   min=0.0, max=1e15)
    target_tokens: float = setting(0.0, "... trained on this many tokens (0: 20 per parameter)", min=0.0,
                                   max=1e18)
    transfer: TransferConfig = field(default_factory=TransferConfig)


@dataclass(frozen=True)
class RunPlan:
    """One point of the grid."""

    name: str
    dim: int
    n_layers: int
    tokens: int
    overrides: tuple[str, ...]
    settings: tuple[tuple[str, Any], ...] = ()  # written beside the run's outcome in results.jsonl


def load_sweep(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    """The validated sweep config, with its paths made absolute against the file's directory."""
    source = os.fspath(path)
    problems: list[Problem] = []
    config = parse_config(SweepConfig, load_yaml(source, empty=EMPTY_SWEEP), source=source, overrides=overrides,
                          problems=problems)
    here = Path(source).resolve().parent
    if not config.base:
        problems.append(Problem("base", "not set; name the job spec the runs start from (e.g. tiny.yaml)"))
    for key in ("base", "data", "output"):
        value = getattr(config, key)
        if value and not value.startswith(("s3://", "gs://")):
            setattr(config, key, str((here / value).resolve()))
    if config.base and not os.path.isfile(config.base):
        problems.append(Problem("base", f"{config.base} is not a file"))
    _grid(config, problems)
    if config.transfer.lrs:
        transfer_grid(config, problems)
    if problems:
        raise SpecError(source, problems)
    return config


def plan_runs(config: SweepConfig) -> list[RunPlan]:
    """The grid as job-spec overrides, each validated against the base spec (every problem of every run at once)."""
    problems: list[Problem] = []
    sizes, budgets = _grid(config, problems)
    if problems:
        raise SpecError("sweep", problems)
    runs = [plan_run(config, f"{config.name}-d{dim}-l{layers}-t{int(tokens)}", dim, layers, tokens, (), problems)
            for dim, layers in sizes for tokens in budgets]
    if problems:
        raise SpecError("sweep", problems)
    return [run for run in runs if run is not None]


def plan_run(config: SweepConfig, name: str, dim: int, layers: int, tokens: float, extra: tuple[str, ...],
             problems: list[Problem]) -> RunPlan | None:
    """One run of `dim` × `layers` on `tokens` as job-spec overrides (`extra` last), validated against the base
    spec: None, with the spec's problems added to `problems` under the run's name, when it refuses them."""
    from orchestrator.validate import load_spec

    step_tokens = config.batch_size * config.seq_len
    steps = max(1, round(tokens / step_tokens))
    overrides = (
        f"name={name}", f"model.dim={dim}", f"model.n_layers={layers}",
        f"model.n_heads={dim // config.head_dim}", "model.n_kv_heads=null",
        f"data.seq_len={config.seq_len}", *([f"data.path={config.data}"] if config.data else []),
        "parallel.dp=1", "parallel.pp=1", "parallel.tp=1", f"parallel.micro_batch_size={config.batch_size}",
        "parallel.grad_accum=1", "parallel.global_batch_size=0",
        f"schedule.steps={steps}", f"schedule.warmup_steps={int(steps * config.warmup_fraction)}",
        f"schedule.eval_every={steps}", f"schedule.eval_batches={config.eval_batches}",
        f"schedule.log_every={steps}",
        f"checkpoint.dir={config.output}/runs/{name}/checkpoints", "checkpoint.every=0",
        "checkpoint.resume=false", "metrics.enabled=false",
        "resources.num_nodes=1", "resources.gpus_per_node=1", "resources.min_nodes=0",
        f"resources.device={'cuda' if config.gpus_per_run else 'cpu'}", *extra,
    )
    try:
        spec = load_spec(config.base, overrides, require_data=True)
    except SpecError as e:
        problems.extend(Problem(f"{name}: {p.path}", p.message) for p in e.problems)
        return None
    return RunPlan(name=name, dim=dim, n_layers=layers, tokens=steps * step_tokens, overrides=overrides,
                   settings=(("lr", spec.optim.lr), ("init_std", spec.model.init_std)) if extra else ())


def run_sweep(config: SweepConfig, address: str | None = None, log=print) -> dict[str, Any]:
    """Train every run not yet in results.jsonl on Ray, then fit, predict and plot; returns the fit summary (with
    `transfer.lrs` set: the hyperparameter transfer of `orchestrator.planner.transfer` instead)."""
    if config.transfer.lrs:
        from orchestrator.planner.transfer import run_transfer

        return run_transfer(config, address, log)
    runs = plan_runs(config)
    train_missing(config, runs, address, log)
    return summarize(config, results_of(config, runs), log)


def train_missing(config: SweepConfig, runs: list[RunPlan], address: str | None, log=print) -> None:
    """Train, on Ray, those of `runs` that results.jsonl does not hold yet."""
    os.makedirs(config.output, exist_ok=True)
    results_path = Path(config.output) / "results.jsonl"
    done = {r["name"]: r for r in read_results(results_path)}
    todo = [r for r in runs if r.name not in done]
    log(f"{len(runs)} runs ({len(runs) - len(todo)} already done), {config.cpus_per_run} CPUs each")
    if todo:
        _train_on_ray(config, todo, results_path, address, log)


def results_of(config: SweepConfig, runs: list[RunPlan]) -> list[dict[str, Any]]:
    """The results.jsonl records of `runs`."""
    names = {run.name for run in runs}
    return [r for r in read_results(Path(config.output) / "results.jsonl") if r["name"] in names]


def _train_on_ray(config: SweepConfig, todo: list[RunPlan], results_path: Path, address: str | None, log) -> None:
    from cluster.local import apply_local_env, local_cluster

    apply_local_env()
    import ray

    def launch() -> None:
        task = ray.remote(train_one).options(num_cpus=config.cpus_per_run, num_gpus=config.gpus_per_run)
        pending = {task.remote(config.base, list(run.overrides)): run for run in todo}
        failed = []
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            run = pending.pop(ready[0])
            outcome = ray.get(ready[0])
            if "error" in outcome:
                failed.append(run.name)
                log(f"  {run.name}: FAILED\n{outcome['error']}")
                continue
            record = {**outcome, "name": run.name, "dim": run.dim, "n_layers": run.n_layers, "tokens": run.tokens,
                      **dict(run.settings)}
            # NaN (never evaluated, diverged) is written as null: JSON has no NaN, and read_results refuses it
            line = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
            with open(results_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
            log(f"  {run.name}: {record['params'] / 1e6:.2f}M parameters, {run.tokens:,} tokens → validation "
                f"loss {record['val_loss']:.4f} ({record['seconds']:.0f} s)")
        if failed:
            log(f"{len(failed)} runs failed ({', '.join(failed)}); a rerun retries them")

    if address:
        ray.init(address=address)
        try:
            launch()
        finally:
            ray.shutdown()
    else:
        with local_cluster():
            launch()


def train_one(base: str, overrides: list[str]) -> dict[str, Any]:
    """One run, in a child process of the Ray task: DeepSpeed and torch.distributed keep process-wide state (and
    can abort at interpreter exit), none of which may reach the Ray worker. Returns the run's size and losses, or
    {"error": the end of its output}."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        cmd = [sys.executable, "-m", "orchestrator.planner.sweep", base, out, *overrides]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not os.path.exists(out):
            return {"error": (done.stdout[-1500:] + done.stderr[-3000:]).strip()}
        with open(out, encoding="utf-8") as f:
            return json.load(f)


def _train_in_this_process(base: str, out: str, overrides: list[str]) -> None:
    from orchestrator.planner.counting import count_params
    from orchestrator.validate import load_spec
    from parallel import train
    from parallel.callbacks import BaseCallback
    from parallel.launch import RankEnv

    spec = load_spec(base, overrides, require_data=True)
    if spec.resources.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    class Record(BaseCallback):
        val_loss = float("nan")

        def on_eval(self, stats) -> None:
            self.val_loss = stats.loss

    record = Record()
    start = time.perf_counter()
    result = train.run(spec, RankEnv(master_port=0), callbacks=[record])  # its own store, on any free port
    outcome = {"params": count_params(spec.model).total, "val_loss": record.val_loss, "train_loss": result.loss,
               "seconds": time.perf_counter() - start}
    with open(out, "w", encoding="utf-8") as f:
        json.dump(outcome, f)


def summarize(config: SweepConfig, results: list[dict[str, Any]], log=print) -> dict[str, Any]:
    """Fit the law to the finished runs, predict the target, draw the plot; write fit.json."""
    from orchestrator.planner.plot import plot_sweep
    from orchestrator.planner.scaling import fit_scaling_law, isoflop_minima

    finished = [r for r in results if _is_number(r["val_loss"]) and math.isfinite(r["val_loss"])]  # never evaluated
    params = [r["params"] for r in finished]
    tokens = [r["tokens"] for r in finished]
    losses = [r["val_loss"] for r in finished]
    law = fit_scaling_law(params, tokens, losses)
    summary: dict[str, Any] = {"runs": len(finished), "law": asdict(law),
                               "isoflop_minima": [dict(zip(("flops", "params", "loss"), m, strict=True))
                                                  for m in isoflop_minima(params, tokens, losses)]}
    max_flops = 6 * max(p * t for p, t in zip(params, tokens, strict=True))
    n_opt, d_opt = law.compute_optimal(max_flops * 10)
    summary["compute_optimal_at_10x"] = {"flops": max_flops * 10, "params": n_opt, "tokens": d_opt}
    if config.target_params:
        target_tokens = config.target_tokens or 20 * config.target_params
        summary["target"] = {"params": config.target_params, "tokens": target_tokens,
                             "predicted_loss": float(law.loss(config.target_params, target_tokens))}
    residuals = [abs(float(law.loss(p, t)) / loss - 1) for p, t, loss in zip(params, tokens, losses, strict=True)]
    summary["mean_abs_relative_residual"] = sum(residuals) / len(residuals)
    with open(Path(config.output) / "fit.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    plot_sweep(Path(config.output) / "scaling.png", params, tokens, losses, law,
               title=f"{config.name}: {len(finished)} runs")
    log(f"L(N, D) = {law.E:.3f} + {law.A:.4g}/N^{law.alpha:.3f} + {law.B:.4g}/D^{law.beta:.3f} "
        f"(mean |residual| {summary['mean_abs_relative_residual']:.2%})")
    if "target" in summary:
        t = summary["target"]
        log(f"predicted loss of {t['params'] / 1e6:.3g}M parameters on {t['tokens']:.3g} tokens: "
            f"{t['predicted_loss']:.4f}")
    return summary


def read_results(path: Path) -> list[dict[str, Any]]:
    """The finished runs of results.jsonl, one JSON object a line; a corrupt line (a run killed mid-write, an edit)
    is a `UserError` naming the file and line, to be deleted so that a rerun trains that run again."""
    if not path.exists():
        return []

    def refused(why: str) -> UserError:
        return UserError(f"{why}; delete the line and run the sweep again")

    results = []
    for number, record in load_json_lines(path, error=refused):
        if not (isinstance(record, dict) and isinstance(record.get("name"), str)
                and all(_is_number(record.get(key)) for key in ("params", "tokens", "seconds"))
                and (record.get("val_loss") is None or _is_number(record["val_loss"]))):
            raise refused(f"{path}, line {number}: not a finished run: it needs name (text), params, tokens, seconds "
                          "(numbers) and val_loss (a number, or null when never evaluated)")
        results.append(record)
    return results


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _grid(config: SweepConfig, problems: list[Problem]) -> tuple[list[tuple[int, int]], list[float]]:
    return _parse_sizes(config, problems), _parse_numbers("tokens", config.tokens, problems)


def _parse_sizes(config: SweepConfig, problems: list[Problem]) -> list[tuple[int, int]]:
    sizes = []
    for item in filter(None, (s.strip() for s in config.sizes.split(","))):
        match = re.fullmatch(r"(\d{1,9})\s*[x×]\s*(\d{1,9})", item)
        if match is None:
            problems.append(Problem("sizes", f"{item!r} is not dim x n_layers (e.g. 128x4)"))
            continue
        dim, layers = int(match.group(1)), int(match.group(2))
        if dim % config.head_dim or dim < config.head_dim:
            problems.append(Problem("sizes", f"dim {dim} is not a multiple of head_dim={config.head_dim}"))
            continue
        sizes.append((dim, layers))
    if not sizes and not problems:
        problems.append(Problem("sizes", "no sizes given; list them as dim x n_layers, e.g. '64x2, 128x4'"))
    return sizes


def _parse_numbers(field: str, text: str, problems: list[Problem]) -> list[float]:
    numbers = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            value = float(item)
        except ValueError:
            problems.append(Problem(field, f"{item!r} is not a number"))
            continue
        if not math.isfinite(value):
            problems.append(Problem(field, f"{item!r} is not a finite number"))
        elif value <= 0:
            problems.append(Problem(field, f"{item} must be positive"))
        else:
            numbers.append(value)
    if not numbers and not problems:
        problems.append(Problem(field, "no values given; list them comma-separated, e.g. '1e5, 2e5'"))
    return numbers




if __name__ == "__main__":
    import sys

    _train_in_this_process(sys.argv[1], sys.argv[2], sys.argv[3:])
    sys.stdout.flush()
    os._exit(0)  # the result is written; DeepSpeed can abort in interpreter teardown (ZeRO-3)
