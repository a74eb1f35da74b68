"""Activation offload (`parallel.activation_offload`): the blocks' inputs kept for backward live in host memory.

Under full checkpointing each block keeps only its input for backward, and at long contexts those inputs are most
of what a step holds beside the logits (the 1B model at seq 128k on one GPU: 20 GiB of fp32 block inputs in a 60 GiB
peak); under selective checkpointing they sit beside the kept matmul outputs. Offload copies each to pinned host
memory as the forward goes on, lets the GPU copy go when the next block's input is saved, and brings it back a few
blocks ahead of the backward that reads it; the last blocks' inputs, which the backward reads first, stay where they
are. Both copies run on their own CUDA streams, so they overlap the blocks' compute: at 128k a block input of 1 GiB
crosses PCIe in tens of milliseconds, a block's backward takes hundreds.

What moves is exactly the blocks' inputs: a tensor autograd saves while the blocks run (between the embedding's
output and the final norm's input, marked by hooks on those two modules, neither of which is compiled) with the
residual stream's shape. Full and selective checkpointing save nothing else of that shape there (selective keeps
the matmuls' outputs, of other widths; under tensor parallelism also the reductions' outputs, which then move too);
parameters, RoPE tables and masks stay where they are. Every block saves as many such tensors as the next, so the
lag and the prefetch count blocks, each the number of tensors a forward moved over its blocks: the copies of a block
with several have the whole next block to finish in, not the next tensor's few operations. On CPU the copies are
plain copies: nothing is gained, and the bookkeeping is the same (the CPU tests hold a run with offload to one
without).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

PREFETCH = 2  # blocks whose saved tensors are brought back ahead of the backward that reads them
LAG = 1  # blocks whose copies to host may still be running when the next block's tensors are saved


@dataclass(frozen=True)
class _Handle:
    """What autograd holds in place of an offloaded tensor: its index in the forward's list."""

    index: int


@dataclass
class _Offloaded:
    host: torch.Tensor
    source: torch.Tensor | None  # the tensor autograd saved, until its copy to host is done or backward takes it
    copied: torch.cuda.Event | None = None  # the copy to host is done
    device: torch.Tensor | None = None  # what backward reads: the source kept, or the copy back once started
    ready: torch.cuda.Event | None = None  # `device` may be read
    used: bool = False  # its block's backward has run: never brought back again


class ActivationOffload:
    """Offload for one model's training forwards: `with offload.forward(): model(...)`, then backward as usual.
    Counts what it did since it was made: `offloaded` tensors (`offloaded_bytes`), `restored` ones, and `kept` ones,
    the last blocks' inputs, still on the GPU when the forward ends and read there by the backward's first blocks.
    `model` has `embed_tokens`, `layers` and `norm`, all of its blocks (pipeline stages are not supported)."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.device = device
        self.offloaded = self.offloaded_bytes = self.restored = self.kept = 0
        self.cuda = device.type == "cuda"
        self.to_host = torch.cuda.Stream(device) if self.cuda else None
        self.to_device = torch.cuda.Stream(device) if self.cuda else None
        self._residual: torch.Size | None = None  # the block inputs' shape while the blocks run, else None
        self._blocks = len(model.layers)
        self._per_block = 1  # tensors moved a block, as the last forward found; 1 until a forward has run
        model.embed_tokens.register_forward_hook(self._blocks_start)
        model.norm.register_forward_pre_hook(self._blocks_end)

    def _blocks_start(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._residual = output.shape

    def _blocks_end(self, module: nn.Module, args: tuple) -> None:
        self._residual = None

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """A training forward whose block inputs go to host memory; autograd brings them back in its backward."""
        saved: list[_Offloaded] = []
        pack, unpack = functools.partial(self._pack, saved), functools.partial(self._unpack, saved)
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                yield
        finally:
            self._residual = None
        self._per_block = max(len(saved) // self._blocks, 1)
        # Backward starts with the last blocks: their inputs stay (or come back) while the loss and head run theirs.
        for entry in reversed(saved[-PREFETCH * self._per_block:]):
            self._bring_back(entry)
        for entry in saved:
            self._release(entry)

    def _pack(self, saved: list[_Offloaded], t: torch.Tensor) -> torch.Tensor | _Handle:
        if (self._residual is None or t.shape != self._residual or isinstance(t, nn.Parameter)
                or not t.is_contiguous()):
            return t
        self.offloaded += 1
        self.offloaded_bytes += t.numel() * t.element_size()
        entry = _Offloaded(torch.empty(t.shape, dtype=t.dtype, pin_memory=self.cuda), source=t)
        if self.cuda:
            self.to_host.wait_stream(self._compute())
            with torch.cuda.stream(self.to_host):
                entry.host.copy_(t, non_blocking=True)
                entry.copied = self.to_host.record_event()
        else:
            entry.host.copy_(t)
        saved.append(entry)
        lag = LAG * self._per_block
        if len(saved) > lag:
            self._release(saved[-1 - lag])
        return _Handle(len(saved) - 1)

    def _release(self, entry: _Offloaded) -> None:
        """Lets an offloaded tensor's GPU memory go once its copy to host is done. The compute stream waits for the
        copy, so the free is ordered after it on the stream that allocated the tensor: at most LAG inputs wait on
        PCIe however far the copies fall behind, where `record_stream` would hold every one still queued."""
        if entry.source is None:
            return
        if entry.copied is not None:
            self._compute().wait_event(entry.copied)
        entry.source = None

    def _unpack(self, saved: list[_Offloaded], packed: torch.Tensor | _Handle) -> torch.Tensor:
        if not isinstance(packed, _Handle):
            return packed
        entry = saved[packed.index]
        entry.used = False  # read again (a tensor saved twice): bring it back again
        self._bring_back(entry)
        if entry.ready is not None:
            self._compute().wait_event(entry.ready)
        t = entry.device
        # Backward runs the blocks last to first: the later blocks are done with theirs, the earlier come next.
        block = packed.index // self._per_block
        for later in saved[(block + 1) * self._per_block:]:
            self._drop(later)
        for earlier in saved[max(block - PREFETCH, 0) * self._per_block:(block + 1) * self._per_block]:
            self._bring_back(earlier)
        return t

    def _bring_back(self, entry: _Offloaded) -> None:
        """Starts the copy back into memory allocated on the compute stream, so that its free after the block's
        backward needs no `record_stream` and goes back to the pool the blocks allocate from."""
        if entry.device is not None or entry.used:
            return
        if entry.source is not None:
            self.kept += 1
            entry.device, entry.source, entry.ready = entry.source, None, entry.copied
            return
        self.restored += 1
        if not self.cuda:
            entry.device = entry.host.clone()
            return
        entry.device = torch.empty(entry.host.shape, dtype=entry.host.dtype, device=self.device)
        self.to_device.wait_stream(self._compute())  # the memory's earlier users on the compute stream are done
        with torch.cuda.stream(self.to_device):
            entry.device.copy_(entry.host, non_blocking=True)
            entry.ready = self.to_device.record_event()

    def _drop(self, entry: _Offloaded) -> None:
        if entry.device is not None and entry.ready is not None:
            self._compute().wait_event(entry.ready)  # a copy never read: done before its memory is reused
        entry.device, entry.used = None, True

    def _compute(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)
