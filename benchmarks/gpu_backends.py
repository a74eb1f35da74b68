"""Both parallel backends and a plain single-file PyTorch loop on the same ~1B Llama, side by side in one launch.

    # one GPU: the plain loop, native (fp32 master weights + bf16 autocast, no FSDP at dp=1), DeepSpeed ZeRO-1
    torchrun --nproc_per_node 1 benchmarks/gpu_backends.py --runs plain,native-zero1,deepspeed-zero1
    # two GPUs: dp2 at ZeRO-1 and ZeRO-3 on both backends, tensor parallelism (tp2), DeepSpeed before its tuning
    torchrun --nproc_per_node 2 benchmarks/gpu_backends.py \
        --runs native-zero1,native-zero3,deepspeed-zero1,deepspeed-zero3,native-zero1-tp2,deepspeed-zero3-untuned

    # the 8B shape, each activation checkpointing mode in one launch
    torchrun --nproc_per_node 2 benchmarks/gpu_backends.py --model examples/llama-8b.yaml --seq-len 4096 \
        --micro-batch-size 1 --grad-accum 8 --runs native-zero3-acnone,native-zero3-acfull,native-zero3-acselective
    # the 8B shape split over two GPUs: tensor parallel (the spec's sequence parallelism), then two pipeline stages
    torchrun --nproc_per_node 2 benchmarks/gpu_backends.py --model examples/llama-8b.yaml --seq-len 4096 \
        --micro-batch-size 1 --grad-accum 8 --runs native-zero1-tp2,native-zero1-pp2-1f1b,native-zero1-pp2-interleaved

A run is `plain` or `<backend>-zero<stage>[-tp<n>][-cp<n>][-pp<n>[-1f1b|-interleaved|-zerobubble]][-ac<mode>]
[-fp8<recipe>][-untuned]`:
`-tp<n>` splits the model over n GPUs, `-cp<n>` each sequence (context parallelism, native), `-pp<n>` cuts it into n
pipeline stages (the rest is data parallel) run by the named schedule (default: the spec's `parallel.pp_schedule`)
over `grad_accum` micro-batches; `-ac<mode>` sets `parallel.activation_checkpointing` (none, full, selective;
every<n> for every_n with that n) for that run, `-fp8<recipe>` sets `parallel.float8` (none, tensorwise, rowwise);
`-untuned` runs DeepSpeed as configured before its tuning (per-step overflow check, bf16 gradients copied to the fp32
accumulator after the backward pass), for before/after figures in one launch.

The spec given by --model (examples/llama-1b.yaml by default: 1.15B parameters, GQA, vocab 50304) is run as written:
its model, data.seq_len and whole `parallel` section (activation checkpointing, sequence parallelism, precision,
compile, micro-batch, accumulation, ...), except the layout, which the run name and the launch's GPUs set (backend,
ZeRO stage, tp, pp, dp = GPUs / (tp·pp)). Command-line flags override single settings for every run; the run name's
`-ac<mode>` overrides them for one. `plain` is the reference loop and takes the model, batch and precision only.
Random tokens already on the GPU (the loader is benchmarked on its own); with `--doc-tokens N`, rows packed with
documents of ~N tokens (exponential lengths, an EOS after each) under per-document masks (`model.attention_mask:
document`), to set beside the causal run of the same layout. Each run: `--warmup` steps (compilation),
then `--repeats` windows of `--steps` timed steps, each between two CUDA synchronisations, the loss read once per
window as a training loop reading it only when it logs would (every step's loss is kept on the device and recorded
after the last window, `losses`: two runs of one model and data, e.g. a layout against one GPU, should follow the
same curve); tokens/s is the median window's. A configuration that
fails is recorded with its error and the others still run. A native pp run also records its bubble (`pipeline`):
the schedule's pass alone, timed over m and 2m micro-batches, gives a micro-batch's busy time and thus the idle
share of a pass, beside the schedule's theory.

tokens/s counts the whole job's tokens. MFU per GPU = `ModelDims.flops_per_token(seq)` (6·N over the matmul weights
+ 12·L·seq·dim for attention, PaLM's formula, no causal halving; whole rows even under per-document masks) ×
tokens/s / (GPUs × 989 TFLOP/s, H100 SXM dense bf16). Peak memory is `torch.cuda.max_memory_allocated`, the
largest over ranks; resident memory is what stays allocated between steps (weights, optimizer states), so
peak − resident is what a step adds (activations, gradients); `--memory-peak` runs one more step of each run under
the CUDA allocator's history and records what is alive at its peak, by the line that allocated it (`memory_peak`,
benchmarks/memory_peak.py). One line per run and a JSON file (device, versions, figures, the `parallel` section that
ran) in --out ($OUT when set, else benchmarks/results/).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from document_mask_cost import EOS, packed_rows
from memory_peak import record_step

from orchestrator.validate import load_yaml, parse_spec
from parallel.documents import document_ids
from parallel.engine import build_engine
from parallel.launch import RankEnv, init_distributed, pick_device
from parallel.loader import MicroBatch
from parallel.materialize import materialize_model
from parallel.model import ModelDims, build_model, cross_entropy
from parallel.optim import build_optimizer, build_param_groups, build_scheduler

REPO = Path(__file__).resolve().parent.parent
H100_FLOPS = 989e12
RUN = re.compile(r"(?P<backend>native|deepspeed)-zero(?P<stage>[0-3])(-tp(?P<tp>\d+))?(-cp(?P<cp>\d+))?"
                 r"(-pp(?P<pp>\d+)(-(?P<schedule>1f1b|interleaved|zerobubble))?)?"
                 r"(-ac(?P<ac>none|full|selective|every(?P<every>[1-9]\d*)))?(?P<offload>-offload)?"
                 r"(-loss(?P<chunks>[1-9]\d*))?(-fp8(?P<fp8>none|tensorwise|rowwise))?(?P<untuned>-untuned)?")
RUN_FORM = ("<native|deepspeed>-zero<0-3>[-tp<n>][-cp<n>][-pp<n>[-1f1b|-interleaved|-zerobubble]][-ac<mode>]"
            "[-offload][-loss<chunks>][-fp8<recipe>][-untuned]")
# The run name's schedule word → `parallel.pp_schedule`.
SCHEDULES = {"1f1b": "1f1b", "interleaved": "interleaved_1f1b", "zerobubble": "zero_bubble"}
# Set by the benchmark's run, not taken from the spec: the layout over the GPUs of this launch.
LAYOUT_KEYS = ("backend", "zero_stage", "dp", "cp", "pp", "tp", "global_batch_size")
# Flags that override the spec's `parallel` setting of the same name when given.
PARALLEL_FLAGS = ("micro_batch_size", "grad_accum", "precision", "compile", "activation_checkpointing",
                  "sequence_parallel", "float8")


def spec_parallel(written: dict, args: argparse.Namespace, **layout) -> dict:
    """The spec's `parallel` section as written, with `layout` in place of its layout keys and the flags given in
    `args` (None: not given) in place of the settings they name."""
    parallel = {k: v for k, v in (written.get("parallel") or {}).items() if k not in LAYOUT_KEYS}
    parallel.update({k: getattr(args, k) for k in PARALLEL_FLAGS if getattr(args, k, None) is not None})
    return {**parallel, **layout}


def add_parallel_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of `PARALLEL_FLAGS`, each defaulting to the spec's value."""
    parser.add_argument("--micro-batch-size", type=int, help="default: the --model spec's")
    parser.add_argument("--grad-accum", type=int, help="default: the --model spec's")
    parser.add_argument("--precision", choices=("bf16", "fp32"), help="default: the --model spec's")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, help="default: the --model spec's")
    parser.add_argument("--activation-checkpointing", choices=("none", "full", "selective"),
                        help="default: the --model spec's; a run's -ac<mode> overrides it")
    parser.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction,
                        help="default: the --model spec's (applies with tp > 1)")
    parser.add_argument("--float8", choices=("none", "tensorwise", "rowwise"),
                        help="default: the --model spec's; a run's -fp8<recipe> overrides it")


def build_spec(backend: str, zero_stage: int, world: int, args: argparse.Namespace, tp: int = 1, pp: int = 1,
               activation_checkpointing: str | None = None, pp_schedule: str | None = None,
               float8: str | None = None, cp: int = 1, activation_offload: bool = False, loss_chunks: int = 0):
    written = load_yaml(args.model)
    parallel = spec_parallel(written, args, backend=backend, zero_stage=zero_stage, tp=tp, pp=pp, cp=cp)
    if activation_offload:
        parallel["activation_offload"] = True
    if loss_chunks:
        parallel["loss_chunks"] = loss_chunks
    if activation_checkpointing and activation_checkpointing.startswith("every"):
        parallel["activation_checkpointing"] = "every_n"
        parallel["activation_checkpointing_every"] = int(activation_checkpointing.removeprefix("every"))
    elif activation_checkpointing:
        parallel["activation_checkpointing"] = activation_checkpointing
    if float8:
        parallel["float8"] = float8
    if pp_schedule:
        parallel["pp_schedule"] = pp_schedule
    raw = {
        "name": "gpu-backends",
        "model": {**written["model"], **({"attention_mask": "document"} if args.doc_tokens else {})},
        "data": {"seq_len": args.seq_len},
        "parallel": parallel,
        "optim": {"lr": 3e-4, "min_lr": 3e-5, "weight_decay": 0.1, "grad_clip": 1.0},
        "schedule": {"steps": 1000, "warmup_steps": 10, "seed": 0},
        "metrics": {"enabled": False},
        "resources": {"device": args.device, "gpus_per_node": world},
    }
    return parse_spec(raw)


def random_micro_batches(spec, device: torch.device, count: int, doc_tokens: int = 0) -> list[list[MicroBatch]]:
    """`count` steps of random rows; with `doc_tokens`, packed documents of about that length and their ids."""
    p, seq, vocab = spec.parallel, spec.data.seq_len, spec.model.vocab_size
    # Ranks of one data-parallel rank's model replica (its tp and cp groups and its pp stages) read the same batch.
    seed = 1234 + dist.get_rank() // (p.tp * p.cp) % p.dp
    generator = torch.Generator(device=device).manual_seed(seed)
    steps = []
    for step in range(count):
        if doc_tokens:
            rows = torch.stack([packed_rows(p.micro_batch_size, seq, doc_tokens, vocab, (seed * count + step) * 64 + i)
                                for i in range(p.grad_accum)]).to(device)
        else:
            rows = torch.randint(0, vocab, (p.grad_accum, p.micro_batch_size, seq + 1), device=device,
                                 generator=generator)
        steps.append([MicroBatch(inputs=r[:, :-1], targets=r[:, 1:], sample_ids=torch.arange(len(r)),
                                 documents=document_ids(r[:, :-1], EOS) if doc_tokens else None) for r in rows])
    return steps


class PlainLoop:
    """The reference: one file's worth of PyTorch — fp32 weights, bf16 autocast, torch.compile of the whole model,
    fused AdamW, clipping, the same LR schedule — and nothing else."""

    def __init__(self, spec, device: torch.device):
        self.model = build_model(spec.model)
        materialize_model(self.model, spec.schedule.seed, device)
        self.compiled = torch.compile(self.model)
        self.optimizer = build_optimizer(build_param_groups(self.model.named_parameters(), spec.optim.weight_decay),
                                         spec.optim, device)
        self.scheduler = build_scheduler(self.optimizer, spec.optim, spec.schedule)
        self.clip = spec.optim.grad_clip
        self.device = device
        self.bf16 = spec.parallel.precision == "bf16"

    def train_step(self, micro_batches: list[MicroBatch]) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for mb in micro_batches:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss = cross_entropy(self.compiled(mb.inputs), mb.targets) / len(micro_batches)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return total


def _engine_loss(engine, micro_batches: list[MicroBatch]) -> torch.Tensor:
    return engine.train_step(micro_batches).loss


def untuned_ds_config(config: dict) -> dict:
    """The DeepSpeed config as it was before tuning: bf16 with its defaults (an overflow flag read back every step,
    gradients copied into the fp32 accumulator after the backward pass)."""
    return {**config, "bf16": {"enabled": config["bf16"]["enabled"]}}


def parse_run(name: str) -> re.Match:
    run = RUN.fullmatch(name)
    if run is None:
        raise SystemExit(f"--runs: {name!r} is not plain or {RUN_FORM}")
    if run["untuned"] and run["backend"] != "deepspeed":
        raise SystemExit(f"--runs: {name!r}: only deepspeed runs have an untuned form")
    return run


def build_runner(name: str, args: argparse.Namespace, env: RankEnv, device: torch.device):
    """The spec and the step function of run `name`."""
    world = env.world_size
    if name == "plain":
        if world != 1:
            raise SystemExit("the plain loop runs on one GPU: launch it with --nproc_per_node 1")
        spec = build_spec("native", 1, world, args)
        return spec, PlainLoop(spec, device).train_step
    run = parse_run(name)
    spec = build_spec(run["backend"], int(run["stage"]), world, args, tp=int(run["tp"] or 1),
                      pp=int(run["pp"] or 1), cp=int(run["cp"] or 1), activation_checkpointing=run["ac"],
                      pp_schedule=SCHEDULES.get(run["schedule"] or ""), float8=run["fp8"],
                      activation_offload=bool(run["offload"]), loss_chunks=int(run["chunks"] or 0))
    if run["untuned"]:
        import parallel.deepspeed_engine as ds_engine

        tuned = ds_engine.build_ds_config
        ds_engine.build_ds_config = lambda s, dims: untuned_ds_config(tuned(s, dims))
        try:
            engine = build_engine(spec, env, device)
        finally:
            ds_engine.build_ds_config = tuned
    else:
        engine = build_engine(spec, env, device)
    return spec, functools.partial(_engine_loss, engine)


def _timed_passes(engine, pairs: list, repeats: int) -> float:
    """Seconds of one pass of the engine's pipeline schedule over `pairs` (forward and backward, no optimizer step):
    one warm-up pass, then the median of `repeats`."""
    times = []
    for _ in range(repeats + 1):
        if pairs[0][0].is_cuda:
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        float(engine._run_pipeline(pairs, train=True, documents=[None] * len(pairs)))
        times.append(time.perf_counter() - start)
    engine.optimizer.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def pipeline_bubble(engine, micro_batches: list[MicroBatch], repeats: int) -> dict:
    """The schedule's measured bubble: its pass timed alone over m and over 2m micro-batches (a second schedule over
    the same stages), so t = (T(2m) − T(m)) / m is a micro-batch's busy time per rank and 1 − m·t / T(m) the idle
    share of a pass; beside the schedule's theory (`bubble_fraction`). The optimizer step is outside both."""
    from parallel.native_pipeline import bubble_fraction, build_schedule

    p, dims = engine.spec.parallel, engine.dims
    m = p.grad_accum
    pairs = [(mb.inputs, mb.targets) for mb in micro_batches]
    single = _timed_passes(engine, pairs, repeats)
    schedule = engine.schedule
    engine.schedule, _, _ = build_schedule(engine.stages, dims.pp_rank, dims.pp, p.pp_schedule, 2 * m,
                                           engine.loss_fn, engine.device, dims.group("pp"))
    try:
        double = _timed_passes(engine, pairs * 2, repeats)
    finally:
        engine.schedule = schedule
    per_micro_batch = (double - single) / m
    return {"pass_s": round(single, 4), "pass_2m_s": round(double, 4), "micro_batch_s": round(per_micro_batch, 4),
            "bubble_measured": round(1 - m * per_micro_batch / single, 4),
            "bubble_theory": round(bubble_fraction(dims.pp, m, p.pp_schedule), 4)}


def measure(name: str, args: argparse.Namespace, env: RankEnv, device: torch.device) -> dict:
    world = env.world_size
    spec, step = build_runner(name, args, env, device)
    batches = random_micro_batches(spec, device, 4, args.doc_tokens)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses = [step(batches[i % len(batches)]).detach() for i in range(args.warmup)]
    if cuda:
        torch.cuda.synchronize()
    # Between steps: weights, optimizer states and what the engine keeps; the peak adds activations and gradients.
    resident = torch.tensor(torch.cuda.memory_allocated() if cuda else 0, device=device)
    dist.all_reduce(resident, op=dist.ReduceOp.MAX)
    windows = []
    for _ in range(args.repeats):
        dist.barrier()
        start = time.perf_counter()
        for i in range(args.steps):
            loss = step(batches[i % len(batches)])
            losses.append(loss.detach())
        final_loss = float(loss)  # the one host sync of the window
        if cuda:
            torch.cuda.synchronize()
        windows.append(time.perf_counter() - start)
    seconds = statistics.median(windows)
    peak = torch.tensor(torch.cuda.max_memory_allocated() if cuda else 0, device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    p = spec.parallel
    tokens_per_step = p.micro_batch_size * p.grad_accum * spec.data.seq_len * p.dp
    tokens_per_s = tokens_per_step * args.steps / seconds
    dims = ModelDims.from_config(spec.model)
    mfu = dims.flops_per_token(spec.data.seq_len) * tokens_per_s / (world * H100_FLOPS)
    extra = {}
    if args.memory_peak and cuda:
        extra["memory_peak"] = record_step(functools.partial(step, batches[0]))
    if p.pp > 1 and p.backend == "native":
        extra["pipeline"] = pipeline_bubble(step.args[0], batches[0], args.repeats)
    del step
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return {"run": name, "gpus": world, "micro_batch_size": p.micro_batch_size, "grad_accum": p.grad_accum,
            "tokens_per_s": round(tokens_per_s), "mfu_per_gpu": round(mfu, 4),
            "peak_mem_gib": round(peak.item() / 2**30, 2), "resident_mem_gib": round(resident.item() / 2**30, 2),
            "step_s": round(seconds / args.steps, 4), "parallel": dataclasses.asdict(p),
            "window_tokens_per_s": [round(tokens_per_step * args.steps / w) for w in windows],
            "final_loss": round(final_loss, 4), "losses": [round(float(x), 4) for x in losses],
            "params": dims.num_params(), "doc_tokens": args.doc_tokens, **extra}


def summary(result: dict) -> str:
    if "error" in result:
        return f"{result['run']:>18} gpus={result['gpus']} FAILED {result['error'][:300]}"
    return (f"{result['run']:>18} gpus={result['gpus']} tokens/s={result['tokens_per_s']:>9,} "
            f"MFU/GPU={result['mfu_per_gpu']:.3f} peak={result['peak_mem_gib']:.1f} GiB "
            f"(resident {result['resident_mem_gib']:.1f}) ac={result['parallel']['activation_checkpointing']} "
            f"step={result['step_s'] * 1000:.0f} ms loss={result['final_loss']}"
            + (" bubble={bubble_measured} (theory {bubble_theory})".format(**result["pipeline"])
               if "pipeline" in result else ""))


def write_results(args: argparse.Namespace, env: RankEnv, device: torch.device, results: list[dict]) -> None:
    import deepspeed

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    record = {"device": name, "gpus": env.world_size, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
              "python": platform.python_version(), "cuda": torch.version.cuda, "seq_len": args.seq_len,
              "timed_steps": args.steps, "repeats": args.repeats, "warmup_steps": args.warmup,
              "peak_flops_per_gpu": H100_FLOPS,
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": results}
    os.makedirs(args.out, exist_ok=True)
    path = Path(args.out) / f"gpu_backends_{env.world_size}gpu.json"
    path.write_text(json.dumps(record, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="plain,native-zero1,deepspeed-zero1",
                        help=f"comma-separated: plain, {RUN_FORM}")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per window")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows; tokens/s is their median")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seq-len", type=int, help="default: the --model spec's data.seq_len")
    parser.add_argument("--model", default=str(REPO / "examples" / "llama-1b.yaml"),
                        help="job spec whose model, seq_len and parallel settings are benchmarked")
    add_parallel_flags(parser)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke run of the script")
    parser.add_argument("--doc-tokens", type=int, default=0,
                        help="rows of packed documents of about this many tokens under per-document masks "
                             "(0: causal rows of random tokens)")
    parser.add_argument("--memory-peak", action="store_true",
                        help="record one more step of each run under the CUDA allocator's history and keep what is "
                             "alive at its peak, by allocating line (benchmarks/memory_peak.py)")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    args.seq_len = args.seq_len or (load_yaml(args.model).get("data") or {}).get("seq_len", 2048)
    names = args.runs.split(",")
    for name in names:
        if name != "plain":
            parse_run(name)
        elif args.doc_tokens:
            raise SystemExit("--doc-tokens: the plain loop has no per-document masks; leave plain out of --runs")
    env = RankEnv.from_env()
    device = pick_device(args.device, env.local_rank)
    init_distributed(env, device)
    torch.backends.cuda.matmul.allow_tf32 = True
    results = []
    for name in names:
        try:
            result = measure(name, args, env, device)
        except Exception as e:  # noqa: BLE001 - one failing configuration must not cost the others' figures
            result = {"run": name, "gpus": env.world_size, "error": f"{type(e).__name__}: {e}"[:2000]}
            gc.collect()
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results.append(result)
        if env.rank == 0:
            print(summary(result), flush=True)
            write_results(args, env, device, results)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
