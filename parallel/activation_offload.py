"""Activation offload (`parallel.activation_offload`): the blocks' inputs kept for backward live in host memory.

Under full checkpointing each block keeps only its input for backward, and at long contexts those inputs are most
of what a step holds beside the logits (the 1B model at seq 128k on one GPU: 20 GiB of fp32 block inputs in a 60 GiB
peak). Offload copies each to pinned host memory as the forward goes on, lets the GPU copy go, and brings it back a
few blocks ahead of the backward that reads it. Both copies run on their own CUDA streams, so they overlap the
blocks' compute: at 128k a block input of 1 GiB crosses PCIe in tens of milliseconds, a block's backward takes
hundreds.

What moves is exactly the blocks' inputs: a tensor autograd saves while the blocks run (between the embedding's
output and the final norm's input, marked by hooks on those two modules, neither of which is compiled) with the
residual stream's shape. Full checkpointing saves nothing else of that shape there; parameters, RoPE tables and
masks stay where they are. On CPU the copies are plain copies: nothing is gained, and the bookkeeping is the same
(the CPU tests hold a run with offload to one without).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

PREFETCH = 2  # block inputs brought back ahead of the backward that reads them


@dataclass(frozen=True)
class _Handle:
    """What autograd holds in place of an offloaded tensor: its index in the forward's list."""

    index: int


@dataclass
class _Offloaded:
    host: torch.Tensor
    copied: torch.cuda.Event | None  # the copy to host is done
    device: torch.Tensor | None = None  # the copy back, once started
    ready: torch.cuda.Event | None = None  # the copy back is done
    used: bool = False  # its block's backward has run: never brought back again


class ActivationOffload:
    """Offload for one model's training forwards: `with offload.forward(): model(...)`, then backward as usual.
    Counts what it moved: `offloaded` tensors (`offloaded_bytes`) and `restored` ones, since it was made."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.device = device
        self.offloaded = self.offloaded_bytes = self.restored = 0
        self.cuda = device.type == "cuda"
        self.to_host = torch.cuda.Stream(device) if self.cuda else None
        self.to_device = torch.cuda.Stream(device) if self.cuda else None
        self._residual: torch.Size | None = None  # the block inputs' shape while the blocks run, else None
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
        # Backward starts with the last blocks: start bringing them back while the loss and the head run theirs.
        for entry in reversed(saved[-PREFETCH:]):
            self._bring_back(entry)

    def _pack(self, saved: list[_Offloaded], t: torch.Tensor) -> torch.Tensor | _Handle:
        if (self._residual is None or t.shape != self._residual or isinstance(t, nn.Parameter)
                or not t.is_contiguous()):
            return t
        self.offloaded += 1
        self.offloaded_bytes += t.numel() * t.element_size()
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.cuda)
        if not self.cuda:
            saved.append(_Offloaded(host.copy_(t), None))
            return _Handle(len(saved) - 1)
        self.to_host.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.to_host):
            host.copy_(t, non_blocking=True)
            t.record_stream(self.to_host)  # its memory is not reused until the copy has read it
            saved.append(_Offloaded(host, self.to_host.record_event()))
        return _Handle(len(saved) - 1)

    def _unpack(self, saved: list[_Offloaded], packed: torch.Tensor | _Handle) -> torch.Tensor:
        if not isinstance(packed, _Handle):
            return packed
        entry = saved[packed.index]
        entry.used = False  # read again (a tensor saved twice): bring it back again
        self._bring_back(entry)
        t = entry.device
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(entry.ready)
            t.record_stream(current)
        # Backward runs the blocks last to first: the later blocks are done with theirs, the earlier come next.
        for later in saved[packed.index + 1:]:
            later.device, later.used = None, True
        for earlier in saved[max(packed.index - PREFETCH, 0):packed.index]:
            self._bring_back(earlier)
        return t

    def _bring_back(self, entry: _Offloaded) -> None:
        if entry.device is not None or entry.used:
            return
        self.restored += 1
        if not self.cuda:
            entry.device = entry.host.clone()
            return
        self.to_device.wait_event(entry.copied)
        with torch.cuda.stream(self.to_device):
            entry.device = entry.host.to(self.device, non_blocking=True)
            entry.ready = self.to_device.record_event()
