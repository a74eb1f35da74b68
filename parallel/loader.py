"""Deterministic, resumable loading of the Arrow shards written by `pretrain prep`.

The sample order is a function of (manifest, seed, epoch) alone: a keyed bijection over the global row index of the
split (`sample_order`), so it needs no memory per row and any position can be computed directly. Step `s` of an epoch
reads positions [s·G, (s+1)·G) of that order, G = micro_batch_size × grad_accum × dp; data-parallel rank r takes the
r-th contiguous slice of G/dp rows and cuts it into grad_accum micro-batches. The loader's state is therefore just
(epoch, index within the epoch, seed): no rank, no dp size. Resuming with another dp size (and the same G) reads
exactly the rows that the uninterrupted run would have read next, only split differently across ranks.

Windows of positions can be skipped (`data.skip`, and a rewind after a loss spike): a step whose positions touch
one starts at its end instead. The windows travel in the state, so a resume skips what the run skipped.

The mixture of sources is applied by `pretrain prep` when it packs rows, so a uniform order over rows keeps the
mixture's proportions in every stretch of training.

Document boundaries are derived from the EOS tokens the packer writes after each document (`parallel.documents`,
the manifest names the EOS id) when the model masks attention per document: `MicroBatch.documents` / `positions`.
They are a function of the row alone, so the shards, the sample order and the loader's state are as before.

Shards on a disk are memory-mapped (`dataprep.shards.open_shard`); the only copy per step is each row into the batch
tensors. Shards in an object store are streamed a row at a time by ranged reads, with the prefetch thread reading
the next steps ahead (`parallel.shard_stream`); the rows, hence the order and the resume, are the same.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from dataprep.hashing import mix64
from dataprep.shards import read_manifest, shard_paths, verify_shard
from orchestrator.errors import DataError
from orchestrator.spec import parse_windows
from parallel.documents import document_ids, document_positions
from parallel.shard_stream import open_split

log = logging.getLogger(__name__)

_FEISTEL_ROUNDS = 6

_PINNED = ("inputs", "targets", "documents", "positions")  # what goes to the device (sample_ids stays on the host)

Window = tuple[int, int, int]  # (epoch, start, end): positions start..end-1 of that epoch's order


@dataclass
class MicroBatch:
    """One micro-batch of this rank: `inputs`/`targets` int64 [rows, seq_len]; `sample_ids` the global row indices;
    `documents` / `positions` [rows, seq_len] each input token's document id within its row and position within
    its document (None unless the loader was asked for them)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    sample_ids: torch.Tensor
    documents: torch.Tensor | None = None
    positions: torch.Tensor | None = None


def _round_keys(seed: int, epoch: int) -> np.ndarray:
    return np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, epoch]).generate_state(
        _FEISTEL_ROUNDS, dtype=np.uint64)


def sample_order(positions: np.ndarray, rows: int, seed: int, epoch: int) -> np.ndarray:
    """Row index at each position of epoch `epoch`'s order: a permutation of range(rows) keyed by (seed, epoch).

    A balanced Feistel network permutes the smallest even power of two ≥ rows; cycle walking (re-applying it to the
    few values that land past `rows`) restricts it to a permutation of range(rows). Unlike a materialised
    permutation this costs O(1) memory for billions of rows and computes any stretch of the order directly.
    """
    half = max(1, math.ceil(math.log2(max(rows, 2)) / 2))
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)
    keys = _round_keys(seed, epoch)

    def permute(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & mask
        for key in keys:
            left, right = right, left ^ (mix64(right ^ key) & mask)
        return (left << shift) | right

    with np.errstate(over="ignore"):
        out = permute(np.asarray(positions, dtype=np.uint64))
        outside = out >= np.uint64(rows)
        while outside.any():
            out[outside] = permute(out[outside])
            outside = out >= np.uint64(rows)
    return out.astype(np.int64)


class ShardLoader:
    """This data-parallel rank's micro-batches of every optimizer step, read ahead by a thread.

    `next_step()` returns grad_accum `MicroBatch`es; `state_dict()` is the position after the last step returned,
    so a checkpoint taken between steps resumes at the next unread step whatever was prefetched. Every shard of the
    split is checked against the manifest (sha256) when the loader is built, so a corrupt file fails at start-up
    with its name rather than as a wrong loss hours later.
    """

    def __init__(self, path: str, *, seq_len: int, micro_batch_size: int, grad_accum: int = 1, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, split: str = "train", shuffle: bool = True, prefetch: int = 2,
                 verify: bool = True, pin_memory: bool = False, skip: list[Window] | tuple[Window, ...] = (),
                 documents: bool = False, cache_dir: str = ""):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
        self.path = path
        self.manifest = read_manifest(path)
        self.split = split
        if split not in self.manifest["splits"]:
            raise DataError(f"{path}/manifest.json: has no {split!r} split; splits: "
                            f"{', '.join(self.manifest['splits'])}")
        width = self.manifest["seq_len"]
        if seq_len > width:
            raise DataError(f"{path}/manifest.json: shards hold rows of seq_len {width}, shorter than the "
                            f"requested seq_len {seq_len}")
        entries = self.manifest["splits"][split]["shards"]
        if verify:
            for entry in entries:
                verify_shard(path, entry)
        files = shard_paths(path, self.manifest, split)
        self.shards = open_split(path, files, entries, width, cache_dir)
        for rows, entry, file in zip(self.shards.lengths, entries, files, strict=True):
            if rows != entry["rows"]:
                raise DataError(f"{file}: holds {rows} rows, manifest.json says {entry['rows']}")
        self.offsets = np.cumsum([0] + self.shards.lengths)
        self.rows = int(self.offsets[-1])
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.global_batch = micro_batch_size * grad_accum * dp_size
        if self.rows < self.global_batch:
            raise DataError(f"{path}: the {split!r} split has {self.rows} rows, fewer than one global batch of "
                            f"{self.global_batch} (micro_batch_size × grad_accum × dp)")
        self.steps_per_epoch = self.rows // self.global_batch
        self.shuffle = shuffle
        self.eos_id = int(self.manifest["tokenizer"]["eos_id"]) if documents else None
        self.pin_memory = pin_memory
        self.prefetch = prefetch
        self._state = {"epoch": 0, "index": 0, "seed": seed}
        self._given_skips = self.skips = sorted(set(skip))
        self.last_read: tuple[int, int] = (0, 0)  # (epoch, index) where the step last returned starts
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Rank-independent position: epoch, sample index within it, seed, the split's size as a guard, and the
        windows skipped (when there are any)."""
        skips = {"skip": [list(w) for w in self.skips]} if self.skips else {}
        return {**self._state, "rows": self.rows, "split": self.split, **skips}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._halt()
        if state.get("rows", self.rows) != self.rows:
            log.warning("the shard split %r of %s now has %d rows, the checkpoint was taken with %s: the sample "
                        "order after resume differs from the uninterrupted run's", self.split, self.path, self.rows,
                        state["rows"])
        self._state = {"epoch": int(state["epoch"]), "index": int(state["index"]), "seed": int(state["seed"])}
        self.skips = sorted(set(self._given_skips) | {tuple(int(x) for x in w) for w in state.get("skip", ())})

    def rewind(self) -> None:
        """Back to the first step of epoch 0 (a validation pass reads the same batches every time)."""
        self.load_state_dict({**self._state, "epoch": 0, "index": 0})

    # ---------------------------------------------------------------------------------------------- reading

    def next_step(self) -> list[MicroBatch]:
        if self.prefetch == 0:
            batches, self.last_read, self._state = self._read_step(self._state)
            return batches
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._thread = None
            raise item
        batches, self.last_read, self._state = item
        return batches

    def __iter__(self) -> Iterator[list[MicroBatch]]:
        while True:
            yield self.next_step()

    def close(self) -> None:
        self._halt()
        self.shards.close()

    def step_ids(self, state: dict[str, Any]) -> np.ndarray:
        """Global row indices of the whole global batch read from `state` (all dp ranks, in rank order)."""
        epoch, index = self._where(state)
        positions = np.arange(index, index + self.global_batch)
        return sample_order(positions, self.rows, state["seed"], epoch) if self.shuffle else positions

    def windows_between(self, start: dict[str, Any], end: dict[str, Any]) -> list[Window]:
        """The windows of every position read from state `start` up to state `end` (a later one)."""
        (epoch, index), epoch_end = self._where(start), self.steps_per_epoch * self.global_batch
        windows = []
        while epoch < end["epoch"]:
            windows.append((epoch, index, epoch_end))
            epoch, index = epoch + 1, 0
        return windows + ([(epoch, index, end["index"])] if index < end["index"] else [])

    def _where(self, state: dict[str, Any]) -> tuple[int, int]:
        """(epoch, index) of the next step: an epoch ends when less than a whole global batch is left, and a step
        touching a skipped window starts at its end."""
        epoch, index, size = state["epoch"], state["index"], self.global_batch
        while True:
            if index + size > self.steps_per_epoch * size:
                epoch, index = epoch + 1, 0
                continue
            hit = next((w for w in self.skips if w[0] == epoch and w[1] < index + size and index < w[2]), None)
            if hit is None:
                return epoch, index
            index = hit[2]

    def _read_step(self, state: dict[str, Any]) -> tuple[list[MicroBatch], tuple[int, int], dict[str, Any]]:
        epoch, index = self._where(state)
        ids = self.step_ids(state)
        per_rank = self.global_batch // self.dp_size
        mine = ids[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        batches = [self._gather(mine[i:i + self.micro_batch_size]) for i in range(0, per_rank, self.micro_batch_size)]
        return batches, (epoch, index), {"epoch": epoch, "index": index + self.global_batch, "seed": state["seed"]}

    def _gather(self, ids: np.ndarray) -> MicroBatch:
        shard_of = np.searchsorted(self.offsets, ids, side="right") - 1
        rows = self.shards.gather(shard_of, ids - self.offsets[shard_of])
        inputs = rows[:, :self.seq_len].astype(np.int64)
        targets = rows[:, 1:self.seq_len + 1].astype(np.int64)
        batch = MicroBatch(torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(ids.copy()))
        if self.eos_id is not None:
            batch.documents = document_ids(batch.inputs, self.eos_id)
            batch.positions = document_positions(batch.documents)
        if self.pin_memory:
            batch = replace(batch, **{name: getattr(batch, name).pin_memory() for name in _PINNED
                                      if getattr(batch, name) is not None})
        return batch

    # ---------------------------------------------------------------------------------------------- prefetch

    def _start(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._produce, args=(dict(self._state),), name="shard-loader",
                                        daemon=True)
        self._thread.start()

    def _produce(self, state: dict[str, Any]) -> None:
        try:
            while not self._stop.is_set():
                item = self._read_step(state)
                state = item[2]
                self._put(item)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it in its own thread
            self._put(e)

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _halt(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self._queue = None


def build_loaders(spec: Any, dp_rank: int, dp_size: int) -> tuple[ShardLoader, ShardLoader | None]:
    """The training loader and, when the shards have a val split, the validation loader of one dp rank."""
    p, d = spec.parallel, spec.data
    common = dict(seq_len=d.seq_len, micro_batch_size=p.micro_batch_size, grad_accum=p.grad_accum, dp_rank=dp_rank,
                  dp_size=dp_size, seed=d.seed)
    common["documents"] = spec.model.attention_mask == "document" or spec.model.rope_positions == "document"
    common["cache_dir"] = d.cache_dir
    train = ShardLoader(d.path, prefetch=d.prefetch, skip=parse_windows(d.skip), **common)
    val_rows = train.manifest["splits"].get("val", {}).get("rows", 0)
    if val_rows < train.global_batch:
        log.warning("%s: the val split has %d rows, fewer than one global batch of %d: no validation", d.path,
                    val_rows, train.global_batch)
        return train, None
    return train, ShardLoader(d.path, split="val", shuffle=False, prefetch=0, **common)
