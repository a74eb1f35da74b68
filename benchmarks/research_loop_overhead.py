"""What in-loop downstream evaluation and the experiment trackers cost a training run, at the default intervals.

    python benchmarks/research_loop_overhead.py                          # 1 GPU: the 1B spec, 150 steps twice
    python benchmarks/research_loop_overhead.py --device cpu --tiny --steps 6 --eval-every 3 --warmup 1   # smoke

Downstream tasks run every `eval.every` steps (1000 by default): too few for a short run to see twice. The loop run
scores them every --eval-every steps instead (50), so each evaluation's stall is measured, and the overhead at the
default interval is projected from it: the mean stall of the evaluations after the first (which also builds the
tasks once per run) over `eval.every` steps of the plain run's median step, plus the trackers' share of a step.

The spec given by --model (examples/llama-1b.yaml by default) trains twice on the same shards, each run in its own
process (`parallel.train.run`, exactly what `pretrain train` runs on each rank, with a rank-0 Prometheus exporter as
the controller would attach):

(a) plain: `metrics.loggers: [prometheus]` (the default) and no `eval.tasks`;
(b) loop: `metrics.loggers: [prometheus, tensorboard, wandb, mlflow]` (W&B offline, MLflow's sqlite store beside the
    checkpoints: their defaults) and `eval.tasks` naming two local lm-eval tasks written here from
    examples/corpus: `loop_mc`, 100 multiple-choice items (which of four word runs continues a King James verse), and
    `loop_gen`, 32 greedy generations (the next word of a verse, exact match), both at the `eval` section's defaults
    (limit 100, batch size 16; every --eval-every steps and at the last).

Both share the rest: held-out loss every --eval-every steps over `schedule.eval_batches` (10), a log line every 10
steps, loss-spike alerts. The model and the `parallel` section are the spec's as written, but one micro-batch per
step (grad_accum 1) so that a run fits in about two minutes on one H200; a step 4x shorter than the spec's makes the
fixed cost of an evaluation a 4x larger share, so the ratio is an upper bound for the spec as written.
Checkpoints: only the one the loop always writes at the last step (the default every 100 steps would write 14 GB
twice a run); it is written after the loop time below ends.

The shards are real text (tests/shards.py: examples/corpus as UTF-8 bytes, read for several epochs) with a byte-level
tokenizer.json (`tests.parallel.test_hf_layouts.byte_tokenizer`), which the downstream tasks need.

Figures per run: median step time after --warmup steps (compilation); loop time from the end of step --warmup to the
end of the last step's evaluation, which holds every evaluation stall and whatever the trackers take from the steps;
each evaluation's seconds (held-out loss, and in (b) the downstream tasks). Overhead = (loop_b - loop_a) / loop_a.
It prints one summary line and writes a JSON record to --out ($OUT when set, else benchmarks/results/).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]

import yaml  # noqa: E402

from orchestrator.spec import EvalConfig  # noqa: E402
from orchestrator.validate import load_yaml, parse_spec  # noqa: E402
from parallel.callbacks import BaseCallback, EvalStats, StepStats  # noqa: E402
from tests.shards import CORPUS, corpus_tokens, write_shards  # noqa: E402

RUNS = {"plain": ["prometheus"], "loop": ["prometheus", "tensorboard", "wandb", "mlflow"]}
TASKS = "loop_mc,loop_gen"
TINY_MODEL = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2}


# ---------------------------------------------------------------------------------------------- data and tasks


def prepare_shards(directory: Path, seq_len: int) -> Path:
    """Real-text byte shards of the whole corpus (the loader reads them for as many epochs as the run needs), a
    tenth of them the val split."""
    from tests.parallel.test_hf_layouts import byte_tokenizer

    available = len(corpus_tokens(10**9)) // (seq_len + 1)
    rows = available * 9 // 10 - 2  # write_shards adds a ninth of the rows for the val split
    write_shards(directory, seq_len=seq_len, rows=rows, rows_per_shard=64)
    byte_tokenizer(directory / "tokenizer.json")
    return directory


def corpus_verses(count: int) -> list[list[str]]:
    """The first `count` King James verses of 12 words or more, as word lists."""
    verses = []
    with gzip.open(CORPUS / "kjv.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            for verse in json.loads(line)["text"].splitlines():
                words = verse.split()
                if len(words) >= 12:
                    verses.append(words)
                if len(verses) == count:
                    return verses
    raise SystemExit(f"{CORPUS}/kjv.jsonl.gz: fewer than {count} verses of 12 words")


def write_tasks(directory: Path) -> Path:
    """loop_mc (100 four-way multiple-choice items) and loop_gen (32 next-word generations), YAML + JSONL."""
    directory.mkdir(parents=True)
    verses = corpus_verses(132)
    mc, gen = verses[:100], verses[100:]
    runs = [" " + " ".join(v[len(v) // 2:len(v) // 2 + 4]) for v in mc]
    mc_rows = []
    for i, words in enumerate(mc):
        answer = i % 4
        others = [runs[(i + k) % len(mc)] for k in (1, 2, 3)]
        mc_rows.append({"question": " ".join(words[:len(words) // 2]),
                        "choices": others[:answer] + [runs[i]] + others[answer:], "answer": answer})
    gen_rows = [{"prompt": " ".join(w[:len(w) // 2]) + " ", "target": w[len(w) // 2].strip(".,;:")} for w in gen]
    common = {"dataset_path": "json", "test_split": "test"}
    tasks = {
        "loop_mc": (mc_rows, {"output_type": "multiple_choice", "doc_to_text": "{{question}}",
                              "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
                              "metric_list": [{"metric": "acc"}]}),
        "loop_gen": (gen_rows, {"output_type": "generate_until", "doc_to_text": "{{prompt}}",
                                "doc_to_target": "{{target}}", "metric_list": [{"metric": "exact_match"}],
                                "generation_kwargs": {"until": [" ", "\n", ".", ",", ";", ":"], "max_gen_toks": 16,
                                                      "do_sample": False}}),
    }
    for name, (rows, config) in tasks.items():
        data = directory / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        config = {**common, **config, "task": name, "dataset_kwargs": {
            "data_files": {"test": str(data)}, "cache_dir": str(directory / "hf-cache")}}
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return directory


# ---------------------------------------------------------------------------------------------- one run (a child)


def build_spec(args: argparse.Namespace, run_name: str, checkpoints: Path):
    written = load_yaml(args.model)
    model = {**written["model"], **(TINY_MODEL if args.tiny else {})}
    parallel = {**written.get("parallel", {}), "micro_batch_size": args.micro_batch_size,
                "grad_accum": args.grad_accum}
    if args.device == "cpu":
        parallel.update(precision="fp32", compile=False)
    schedule = {"steps": args.steps, "warmup_steps": min(10, args.steps), "lr_schedule": "wsd", "seed": 0,
                "eval_every": args.eval_every}
    raw = {
        "name": f"loop-overhead-{run_name}", "model": model, "data": {"path": args.data, "seq_len": args.seq_len},
        "parallel": parallel, "optim": written.get("optim", {}), "schedule": schedule,
        "checkpoint": {"dir": str(checkpoints), "every": 0, "resume": False},
        "metrics": {"loggers": RUNS[run_name], "host": "127.0.0.1", "port": 0},
        "resources": {"device": args.device, "gpus_per_node": 1},
    }
    if run_name == "loop":
        raw["eval"] = {"tasks": TASKS, "include_path": args.tasks, "every": args.eval_every}
    return parse_spec(raw)


class Clock(BaseCallback):
    """When each step and each evaluation ended (the last callback: after every other one's work)."""

    def __init__(self):
        self.steps: list[dict] = []
        self.evals: list[dict] = []

    def on_step(self, stats: StepStats) -> None:
        self.steps.append({"step": stats.step, "t": time.perf_counter(), "seconds": stats.step_seconds,
                           "loss": stats.loss})

    def on_eval(self, stats: EvalStats) -> None:
        self.evals.append({"step": stats.step, "t": time.perf_counter(), "seconds": stats.seconds,
                           "loss": stats.loss, "scores": stats.scores})


def child(args: argparse.Namespace) -> None:
    """Train run --child and write its clock to --result."""
    import torch

    from cluster.metrics import RankExporter
    from parallel.launch import RankEnv
    from parallel.train import run

    torch.backends.cuda.matmul.allow_tf32 = True
    checkpoints = Path(args.result).parent / f"ckpt-{args.child}"
    spec = build_spec(args, args.child, checkpoints)
    clock = Clock()
    exporter = RankExporter.from_spec(spec, 0, 0, advertise_host="127.0.0.1")
    begin = time.perf_counter()
    run(spec, RankEnv(master_port=0), callbacks=[exporter, clock])
    total = time.perf_counter() - begin
    shutil.rmtree(checkpoints, ignore_errors=True)  # ~14 GB at 1B; the next run shares the disk
    Path(args.result).write_text(json.dumps({"steps": clock.steps, "evals": clock.evals, "run_s": total}))


# ---------------------------------------------------------------------------------------------- the comparison


def summarise(name: str, clock: dict, warmup: int) -> dict:
    steps = [s for s in clock["steps"] if s["step"] > warmup]
    start = next(s["t"] for s in clock["steps"] if s["step"] == warmup)
    end = max([s["t"] for s in steps] + [e["t"] for e in clock["evals"]])
    median = statistics.median(s["seconds"] for s in steps)
    return {"run": name, "loggers": RUNS[name], "median_step_s": round(median, 4),
            "loop_s": round(end - start, 3), "timed_steps": len(steps), "process_s": round(clock["process_s"], 1),
            "run_s": round(clock["run_s"], 1), "loss_last": round(steps[-1]["loss"], 4),
            "evals": [{"step": e["step"], "seconds": round(e["seconds"], 3),
                       "scores": {k: round(v, 4) for k, v in e["scores"].items()}} for e in clock["evals"]]}


def parent(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="loop_overhead_"))
    try:
        data = prepare_shards(work / "shards", args.seq_len)
        tasks = write_tasks(work / "tasks")
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "WANDB_SILENT": "true"}
        clocks = {}
        for name in RUNS:
            result = work / f"{name}.json"
            cmd = [sys.executable, __file__, *sys.argv[1:], "--child", name, "--data", str(data),
                   "--tasks", str(tasks), "--result", str(result)]
            begin = time.perf_counter()
            subprocess.run(cmd, env=env, check=True, cwd=work)
            clocks[name] = {**json.loads(result.read_text()), "process_s": time.perf_counter() - begin}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    plain, loop = (summarise(name, clocks[name], args.warmup) for name in RUNS)
    overhead = (loop["loop_s"] - plain["loop_s"]) / plain["loop_s"]
    plain_evals = {e["step"]: e["seconds"] for e in plain["evals"]}
    stalls = [{"step": e["step"], "downstream_s": round(e["seconds"] - plain_evals.get(e["step"], 0.0), 3)}
              for e in loop["evals"]]
    import torch

    per_eval = ", ".join(f"step {s['step']}: {s['downstream_s']:.2f} s" for s in stalls)
    default_every = EvalConfig().every
    warm = statistics.mean(s["downstream_s"] for s in stalls[1:]) if len(stalls) > 1 else stalls[0]["downstream_s"]
    step_share = loop["median_step_s"] / plain["median_step_s"] - 1
    projected = warm / (default_every * plain["median_step_s"]) + step_share
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu"
    record = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
              "model": args.model, "tiny": args.tiny, "seq_len": args.seq_len,
              "micro_batch_size": args.micro_batch_size, "grad_accum": args.grad_accum, "steps": args.steps,
              "warmup_steps_left_out": args.warmup, "eval_every": args.eval_every,
              "tasks": TASKS, "results": [plain, loop], "overhead_ratio": round(overhead, 4),
              "downstream_stall_per_eval": stalls, "default_eval_every": default_every,
              "projected_overhead_at_default_intervals": round(projected, 4),
              "step_time_ratio": round(loop["median_step_s"] / plain["median_step_s"], 4),
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    os.makedirs(args.out, exist_ok=True)
    path = Path(args.out) / f"research_loop_overhead_{'tiny_' if args.tiny else ''}{args.device}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"RESULT at the default intervals (eval.every {default_every}) {projected:+.2%}; measured every "
          f"{args.eval_every} steps {overhead:+.2%} of the loop time: plain {plain['loop_s']:.1f} s "
          f"(median step {plain['median_step_s'] * 1e3:.0f} ms), eval+trackers {loop['loop_s']:.1f} s "
          f"(median step {loop['median_step_s'] * 1e3:.0f} ms) over {plain['timed_steps']} steps; downstream stall "
          f"per evaluation {per_eval}; "
          f"wrote {path}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "examples" / "llama-1b.yaml"),
                        help="spec whose model, seq_len, optim and parallel settings are used")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer dim-64 model instead (a smoke run)")
    parser.add_argument("--seq-len", type=int, help="default: the --model spec's data.seq_len")
    parser.add_argument("--micro-batch-size", type=int, help="default: the --model spec's")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=150, help="three evaluations at --eval-every 50")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the figures (compilation)")
    parser.add_argument("--eval-every", type=int, default=50,
                        help="steps between evaluations in both runs (held-out loss; the loop run's tasks too)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke run of the script")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "results"))
    parser.add_argument("--child", choices=tuple(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--tasks", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    written = load_yaml(args.model)
    args.seq_len = args.seq_len or (written.get("data") or {}).get("seq_len", 2048)
    args.micro_batch_size = args.micro_batch_size or (written.get("parallel") or {}).get("micro_batch_size", 1)
    if args.warmup >= args.steps:
        raise SystemExit(f"--warmup {args.warmup} must be below --steps {args.steps}")
    (child if args.child else parent)(args)


if __name__ == "__main__":
    main()
