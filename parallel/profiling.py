"""Profiles of a running job: a torch.profiler trace of N steps from every rank, and on GPUs a CUDA memory snapshot.

Two ways to ask: `profile.at_step` in the spec, which every rank reads, and `pretrain profile`, which drops a request
file beside the checkpoints (`parallel.profile_requests`). Only rank 0 looks for the file, with one `os.stat` at most
every `POLL_S`; the ranks learn of it at the loop's per-step synchronisation, which `sync` is: an all-reduce of one
number (the steps rank 0 was asked for) in place of a plain barrier, so agreeing on the start step costs nothing more.
Every rank then profiles the same steps: from that step's start to the end of the last one (its evaluation and
checkpoint included), writes `rank_<r>.json` (Chrome / Perfetto JSON: `chrome://tracing`, ui.perfetto.dev) and, on
CUDA, `rank_<r>_memory.pickle` (`torch.cuda.memory._dump_snapshot`: pytorch.org/memory_viz reads it). Once all have
written, rank 0 writes `done.json`, which the command waits for. Traces are written where the checkpoints are, so a
remote (`s3://`) checkpoint.dir gets none (validation refuses `profile.at_step` there).
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from orchestrator.spec import JobSpec
from parallel.launch import barrier
from parallel.profile_requests import REQUEST, profiles_dir, step_dir, take_request, write_done

POLL_S = 1.0
MEMORY_ENTRIES = 100_000  # allocation events the CUDA memory history keeps


class ProfileTrigger:
    """The loop's per-step synchronisation, and the profiles it starts and stops."""

    def __init__(self, spec: JobSpec, rank: int, device: torch.device):
        self.rank, self.device = rank, device
        self.dir = None if "://" in spec.checkpoint.dir else spec.checkpoint.dir
        self.at_step, self.at_steps, self.total = spec.profile.at_step, spec.profile.steps, spec.schedule.steps
        self._polled = 0.0
        self._request: dict | None = None
        self._profiler: torch.profiler.profile | None = None
        self._first = self._last = 0
        self._request_id = ""

    def sync(self, step: int) -> None:
        """Wait for every rank (the loop's barrier), learning meanwhile whether rank 0 was asked for a profile;
        start one at this step if it was, or if the spec asks for one here."""
        asked = self._poll() if self.rank == 0 else 0
        if dist.is_initialized() and dist.get_world_size() > 1:
            value = torch.tensor([asked], dtype=torch.int64, device=self.device)
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
            asked = int(value.item())
        if self._profiler is not None or self.dir is None:
            return
        if asked:
            self._start(step, asked, self._request["id"] if self._request else "")
        elif step == self.at_step:
            self._start(step, self.at_steps, "")

    def _poll(self) -> int:
        """Steps asked for by a request waiting in the profiles folder (taking it), checked at most every POLL_S."""
        now = time.monotonic()
        if self.dir is None or self._profiler is not None or now - self._polled < POLL_S:
            return 0
        self._polled = now
        if not os.path.exists(os.path.join(profiles_dir(self.dir), REQUEST)):
            return 0
        self._request = take_request(self.dir)
        return self._request["steps"] if self._request else 0

    def _start(self, step: int, steps: int, request_id: str) -> None:
        self._first, self._last, self._request_id = step, min(step + steps, self.total + 1) - 1, request_id
        if self.rank == 0:
            print(f"step {step:>6} | profiling steps {step} to {self._last} into {step_dir(self.dir, step)}",
                  flush=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_ENTRIES)
        self._profiler = torch.profiler.profile(activities=activities, acc_events=True)  # one cycle: no warning
        self._profiler.start()

    def after_step(self, step: int) -> None:
        """The end of a step of the loop: the last profiled one stops the profile and writes it."""
        if self._profiler is None or step < self._last:
            return
        profiler, self._profiler = self._profiler, None
        profiler.stop()
        out = step_dir(self.dir, self._first)
        os.makedirs(out, exist_ok=True)
        profiler.export_chrome_trace(os.path.join(out, f"rank_{self.rank}.json"))
        if self.device.type == "cuda":
            torch.cuda.memory._dump_snapshot(os.path.join(out, f"rank_{self.rank}_memory.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        barrier()  # every rank's files are written
        if self.rank == 0:
            files = sorted(os.path.join(out, name) for name in os.listdir(out) if name.startswith("rank_"))
            write_done(out, {"id": self._request_id, "step": self._first, "steps": self._last - self._first + 1,
                             "files": files})
            print(f"step {step:>6} | profile written: {', '.join(files)}", flush=True)

    def close(self) -> None:
        """Stop a profile the run ended inside of (its last steps were not reached), writing nothing."""
        if self._profiler is not None:
            self._profiler.stop()
            self._profiler = None
