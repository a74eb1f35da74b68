"""The whole training stack on GPUs beside a plain PyTorch loop of the same Llama, in one launch.

    torchrun --nproc_per_node 1 benchmarks/gpu_train.py                 # 1 GPU: ZeRO-1 (DeepSpeed), plain loop
    torchrun --nproc_per_node 2 benchmarks/gpu_train.py --zero-stage 3  # 2 GPUs: dp2, plain loop on each GPU

(a) ours: `parallel.train.run`, exactly what `pretrain train` runs: spec → engine (DeepSpeed, bf16, compiled
    blocks) → `ShardLoader` over Arrow shards with its prefetch thread → step, log, checkpoint at the end (async).
(b) the reference: `PlainLoop` of benchmarks/gpu_backends.py — fp32 weights + bf16 autocast, SDPA, torch.compile of
    the whole model, fused AdamW, clipping, nothing else — fed the same shards, on every GPU independently.

The spec given by --model (examples/llama-1b.yaml by default: 1.15B parameters, GQA, vocab 50304, seq 2048,
micro-batch 8 × grad_accum 4 per GPU) runs as written: its model, data.seq_len and `parallel` section (activation
checkpointing, precision, compile, batch, ...), data parallel over the launch's GPUs with --backend and --zero-stage;
flags (--micro-batch-size, --activation-checkpointing, ...) override single settings. On CPU (a smoke run) it is
fp32 and uncompiled. The shards hold learnable synthetic tokens (Zipf unigrams, half of them a fixed successor of
the previous token), so the losses fall within the run; `--data DIR` uses shards of `pretrain prep` instead.

Figures: median over the steps after `--warmup` of each step's time (a host sync per step, as the loop does).
tokens/s per GPU; MFU per GPU = (6·N + 12·L·seq·dim) · tokens/s / 989 TFLOP/s (`ModelDims.flops_per_token`,
`parallel.callbacks.mfu`); peak memory = `torch.cuda.max_memory_allocated`. It prints a line per run, the ratio
(a)/(b) per GPU, and writes a JSON record (device, versions, figures) to --out ($OUT when set, else
benchmarks/results/).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from gpu_backends import PlainLoop, add_parallel_flags, spec_parallel  # noqa: E402

from dataprep.shards import MANIFEST_FILE, ShardWriter, write_manifest  # noqa: E402
from orchestrator.validate import load_yaml, parse_spec  # noqa: E402
from parallel.callbacks import BaseCallback, StepStats, mfu  # noqa: E402
from parallel.launch import RankEnv, pick_device  # noqa: E402
from parallel.loader import MicroBatch, ShardLoader  # noqa: E402
from parallel.model import ModelDims  # noqa: E402
from parallel.train import run  # noqa: E402


def write_synthetic_shards(directory: Path, seq_len: int, rows: int, vocab: int) -> None:
    """Zipf-distributed token ids where half the positions follow their predecessor by a fixed successor map:
    unigram and bigram structure a model picks up in tens of steps, so the losses visibly fall."""
    rng = np.random.default_rng(0)
    weights = 1.0 / np.arange(1, vocab + 1)
    ids = rng.permutation(vocab)[rng.choice(vocab, size=(rows, seq_len + 1), p=weights / weights.sum())]
    successor = rng.permutation(vocab)
    follow = rng.random((rows, seq_len + 1)) < 0.5
    for i in range(1, seq_len + 1):
        ids[:, i] = np.where(follow[:, i], successor[ids[:, i - 1]], ids[:, i])
    packed = ids.astype(np.int32)
    with ShardWriter(directory, "train", seq_len, rows_per_shard=256) as writer:
        writer.write(packed)
    entries = writer.close()
    write_manifest(directory, {
        "format_version": 1, "seq_len": seq_len, "config_hash": "synthetic-zipf-bigram",
        "tokenizer": {"file": "tokenizer.json", "vocab_size": vocab, "eos_id": vocab - 1},
        "sources": {"synthetic": {"tokens": int(packed.size)}},
        "splits": {"train": {"shards": entries, "rows": rows, "tokens": int(packed.size)}},
    })


def prepare_data(args: argparse.Namespace, env: RankEnv, vocab: int, rows: int) -> str:
    if args.data:
        return args.data
    directory = Path(tempfile.gettempdir()) / f"gpu_train_shards_{args.seq_len}_{rows}_{vocab}"
    if env.local_rank == 0 and not (directory / MANIFEST_FILE).exists():
        write_synthetic_shards(directory, args.seq_len, rows, vocab)
    deadline = time.monotonic() + 300
    while not (directory / MANIFEST_FILE).exists():  # the other ranks of this node wait for local rank 0
        if time.monotonic() > deadline:
            raise SystemExit(f"{directory}: shards not written within 300 s")
        time.sleep(0.5)
    return str(directory)


def build_spec(args: argparse.Namespace, env: RankEnv, data: str | None, checkpoints: str):
    """The --model spec's model and `parallel` section as written (flags override single settings), data parallel
    over this launch's GPUs with --backend and --zero-stage."""
    written = load_yaml(args.model)
    parallel = spec_parallel(written, args, backend=args.backend, zero_stage=args.zero_stage)
    if args.device == "cpu":
        parallel.update(precision="fp32", compile=False)
    raw = {
        "name": "gpu-train",
        "model": written["model"],
        "data": {"path": data or "", "seq_len": args.seq_len},
        "parallel": parallel,
        "optim": {"lr": 6e-4, "min_lr": 6e-5, "weight_decay": 0.1, "grad_clip": 1.0},
        "schedule": {"steps": args.warmup + args.steps, "warmup_steps": 5, "lr_schedule": "wsd", "eval_every": 0,
                     "log_every": 5, "seed": 0},
        "checkpoint": {"dir": checkpoints, "every": 0, "keep_last": 1, "resume": False, "async_save": True},
        "metrics": {"enabled": False},
        "resources": {"device": args.device, "gpus_per_node": env.world_size},
    }
    return parse_spec(raw)


class StepRecorder(BaseCallback):
    def __init__(self):
        self.steps: list[StepStats] = []

    def on_step(self, stats: StepStats) -> None:
        self.steps.append(stats)


def summarise(name: str, seconds: list[float], losses: list[float], tokens_per_gpu_step: int, flops: float,
              warmup: int, device: torch.device) -> dict:
    step = statistics.median(seconds[warmup:])
    rate = tokens_per_gpu_step / step
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {"run": name, "step_s": round(step, 4), "tokens_per_s_per_gpu": round(rate),
            "mfu_per_gpu": round(mfu(flops, rate, 1, 989e12), 4), "peak_mem_gib": round(peak / 2**30, 2),
            "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4)}


def run_reference(spec, env: RankEnv, device: torch.device, args: argparse.Namespace) -> dict:
    """The plain loop on this GPU alone, reading this rank's share of the same shards."""
    loop = PlainLoop(spec, device)
    p = spec.parallel
    loader = ShardLoader(spec.data.path, seq_len=spec.data.seq_len, micro_batch_size=p.micro_batch_size,
                         grad_accum=p.grad_accum, dp_rank=env.rank, dp_size=env.world_size, seed=spec.data.seed)
    seconds, losses = [], []
    for _ in range(spec.schedule.steps):
        begin = time.perf_counter()
        batches = [MicroBatch(mb.inputs.to(device, non_blocking=True), mb.targets.to(device, non_blocking=True),
                              mb.sample_ids) for mb in loader.next_step()]
        losses.append(float(loop.train_step(batches)))
        seconds.append(time.perf_counter() - begin)
    loader.close()
    dims = ModelDims.from_config(spec.model)
    result = summarise("plain", seconds, losses, p.micro_batch_size * p.grad_accum * spec.data.seq_len,
                       dims.flops_per_token(spec.data.seq_len), args.warmup, device)
    del loop
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "examples" / "llama-1b.yaml"),
                        help="spec whose model, seq_len and parallel settings are used")
    parser.add_argument("--backend", default="auto", choices=("auto", "deepspeed", "native"),
                        help="auto: what `pretrain train` would pick for the spec")
    parser.add_argument("--zero-stage", type=int, default=1, choices=(0, 1, 2, 3))
    parser.add_argument("--seq-len", type=int, help="default: the --model spec's data.seq_len")
    add_parallel_flags(parser)
    parser.add_argument("--steps", type=int, default=30, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=8, help="steps left out of the medians (compilation)")
    parser.add_argument("--data", default="", help="shards of `pretrain prep` instead of synthetic ones")
    parser.add_argument("--no-reference", action="store_true", help="skip the plain loop")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke run of the script")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    env = RankEnv.from_env()
    device = pick_device(args.device, env.local_rank)
    torch.backends.cuda.matmul.allow_tf32 = True
    written = load_yaml(args.model)
    args.seq_len = args.seq_len or (written.get("data") or {}).get("seq_len", 2048)
    checkpoints = tempfile.mkdtemp(prefix="gpu_train_ckpt_") if env.world_size == 1 else \
        str(Path(tempfile.gettempdir()) / f"gpu_train_ckpt_{os.environ.get('MASTER_PORT', '0')}")
    batch = build_spec(args, env, None, checkpoints).parallel
    rows = (args.warmup + args.steps) * batch.micro_batch_size * batch.grad_accum * env.world_size
    data = prepare_data(args, env, written["model"]["vocab_size"], rows)
    spec = build_spec(args, env, data, checkpoints)
    results = [] if args.no_reference else [run_reference(spec, env, device, args)]

    recorder = StepRecorder()
    run(spec, env, callbacks=[recorder])
    if env.local_rank == 0:
        shutil.rmtree(checkpoints, ignore_errors=True)  # tens of GB for a 1B model; a later call may share the disk
    p = spec.parallel
    dims = ModelDims.from_config(spec.model)
    name = f"ours-{p.backend}-zero{p.zero_stage}-dp{env.world_size}"
    ours = summarise(name, [s.step_seconds for s in recorder.steps],
                     [s.loss for s in recorder.steps], p.micro_batch_size * p.grad_accum * spec.data.seq_len,
                     dims.flops_per_token(spec.data.seq_len), args.warmup, device)
    results.append(ours)
    if env.rank == 0:
        for r in results:
            print(f"RESULT {r['run']:>26} gpus={env.world_size} tokens/s/GPU={r['tokens_per_s_per_gpu']:>8,} "
                  f"MFU/GPU={r['mfu_per_gpu']:.3f} peak={r['peak_mem_gib']:.1f} GiB step={r['step_s'] * 1e3:.0f} ms "
                  f"loss {r['loss_first']} → {r['loss_last']}", flush=True)
        record = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                  "gpus": env.world_size, "torch": torch.__version__, "python": platform.python_version(),
                  "cuda": torch.version.cuda, "params": dims.num_params(), "seq_len": args.seq_len,
                  "micro_batch_size": p.micro_batch_size, "grad_accum": p.grad_accum,
                  "parallel": dataclasses.asdict(p),
                  "timed_steps": args.steps, "warmup_steps": args.warmup, "peak_flops_per_gpu": 989e12,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": results}
        if not args.no_reference:
            ratio = ours["tokens_per_s_per_gpu"] / results[0]["tokens_per_s_per_gpu"]
            record["ratio_ours_to_plain_per_gpu"] = round(ratio, 3)
            print(f"RATIO ours/plain tokens/s per GPU = {ratio:.3f}", flush=True)
        os.makedirs(args.out, exist_ok=True)
        path = Path(args.out) / f"gpu_train_{env.world_size}gpu_zero{p.zero_stage}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {path}")
    sys.stdout.flush()
    os._exit(0)  # DeepSpeed's ZeRO-3 can abort in interpreter teardown after a finished run


if __name__ == "__main__":
    main()
