"""What the vocabulary-parallel loss costs a tensor-parallel rank, eager and compiled, beside the compiled unsharded
loss over logits of the same width: the time of a forward and backward and the memory above the logits.

    python benchmarks/vocab_parallel_loss.py --rows 4096 --vocab 128256 --tp 2

A tp rank's lm_head leaves it [rows, vocab / tp] bf16 logits (Llama-3-8B's vocabulary at seq 4096 and tp2: 0.5 GB a
micro-batch); the loss then runs on the last pipeline stage's critical path once per micro-batch. It is timed here
in a group of one process, where the three small all-reduces it adds over a real group cost nothing, so what is
compared is the arithmetic over the logits: how many times it reads and writes them, and what it keeps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from parallel.megatron_tp import vocab_parallel_cross_entropy
from parallel.model import cross_entropy


def measure(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], logits: torch.Tensor,
            labels: torch.Tensor, repeats: int) -> dict:
    """Median milliseconds of loss_fn's forward and backward, and its peak memory above the logits in MiB."""
    times, peaks = [], []
    for _ in range(repeats + 2):  # two warm-ups: compile, then the allocator
        x = logits.detach().requires_grad_()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss_fn(x, labels).backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        peaks.append(torch.cuda.max_memory_allocated() - base)
        del x
    return {"ms": round(1000 * statistics.median(times[2:]), 3), "peak_above_logits_mib": round(max(peaks) / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096, help="tokens a micro-batch gives the loss")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as store:
        dist.init_process_group("nccl", init_method=f"file://{store}/store", rank=0, world_size=1,
                                device_id=torch.device("cuda", 0))
        width = args.vocab // args.tp
        g = torch.Generator(device="cuda").manual_seed(0)
        logits = torch.randn(args.rows, width, device="cuda", generator=g).mul_(3).bfloat16()
        labels = torch.randint(0, width, (args.rows,), device="cuda", generator=g)
        fused = torch.compile(cross_entropy)
        runs = {
            "vocab_parallel_eager": measure(lambda x, y: vocab_parallel_cross_entropy(x, y, None), logits, labels,
                                            args.repeats),
            "vocab_parallel_compiled": measure(lambda x, y: vocab_parallel_cross_entropy(x, y, None, True), logits,
                                               labels, args.repeats),
            "unsharded_compiled": measure(fused, logits, labels, args.repeats),
        }
        dist.destroy_process_group()
    result = {"rows": args.rows, "width": width, "logits_mib": round(logits.nbytes / 2**20, 1),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": runs}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
