"""One rank of the document-masking layout runs: for each case, the logit probes of `probe` on an engine of that
layout, then the layout-equivalence training run of `layout_worker.run_case`. Started by torchrun from
tests/helpers.py (run_layout with this worker):

    torchrun --nproc_per_node 2 tests/parallel/documents_worker.py OUT.pt --cases CASES.json
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from orchestrator.validate import parse_spec
from parallel.documents import document_ids, split_positions
from parallel.engine import build_engine
from parallel.launch import RankEnv
from tests.parallel.layout_worker import EOS, GLOBAL_BATCH, GRAD_ACCUM, TINY, main, run_case

# Rows of the probe: documents end at these EOS positions, so row 0 holds [0, 9], [10, 20] and [21, seq).
ENDS = (9, 20)


def probe_rows(seq_len: int, vocab: int) -> torch.Tensor:
    """[GLOBAL_BATCH, seq_len] tokens: row 1 is row 0 with its first document's tokens changed; row 2 starts with
    row 0's second document; the other rows are filler (a pipeline step takes whole micro-batches)."""
    g = torch.Generator().manual_seed(5)
    rows = torch.randint(EOS + 1, vocab, (GLOBAL_BATCH, seq_len), generator=g)
    rows[:, list(ENDS)] = EOS
    rows[1, ENDS[0]:] = rows[0, ENDS[0]:]
    second = rows[0, ENDS[0] + 1:ENDS[1] + 1]
    rows[2, :len(second)] = second
    return rows


def probe_diffs(logits: torch.Tensor) -> dict[str, float]:
    """What the probe rows' logits [rows, seq, vocab] show: `moved`, the largest change of the other documents'
    logits when the first document changed (0 when they are independent of it); `perturbed`, that of the first
    document's own (nonzero: the change reached the model); `alone`, the difference between the second document
    inside the pack and at the start of a row."""
    start, end = ENDS[0] + 1, ENDS[1] + 1
    return {"moved": float((logits[1, start:] - logits[0, start:]).abs().max()),
            "perturbed": float((logits[1, :ENDS[0]] - logits[0, :ENDS[0]]).abs().max()),
            "alone": float((logits[0, start:end] - logits[2, :end - start]).abs().max())}


@torch.no_grad()
def engine_logits(engine, rows: torch.Tensor, documents: torch.Tensor) -> torch.Tensor | None:
    """This rank's logits of the rows (a tensor-parallel rank's vocabulary shard), or None on a pipeline stage
    without the head; a pipeline runs its schedule with the document ids as a keyword input of every stage. A
    context-parallel rank runs its tokens of the rows (with the whole rows' document ids, as the engine does) and
    gathers the whole sequence's logits from its cp peers."""
    dims, every = engine.dims, None
    if dims.cp > 1:
        every = split_positions(documents, rows.shape[1], dims.cp, engine.spec.model.attention_mask, rows.device)
        every = every.expand(len(rows), -1, -1)
        rows = rows.gather(1, every[:, dims.cp_rank])
    if not engine.pipelined:
        logits = engine.model(rows, documents=documents)
        logits = logits.to_local() if isinstance(logits, DTensor) else logits
    else:
        args = (rows,) if engine.first_stage else ()
        kwargs = {"target": torch.zeros_like(rows), "losses": []} if engine.last_stage else {}
        out = engine.schedule.eval(*args, documents=documents, **kwargs)
        logits = out if engine.last_stage else None
    if logits is None or every is None:
        return logits
    parts = [torch.empty_like(logits) for _ in range(dims.cp)]
    dist.all_gather(parts, logits.contiguous(), group=dims.group("cp"))
    whole = logits.new_empty(len(rows), every.shape[1] * every.shape[2], logits.shape[-1])
    for rank, part in enumerate(parts):
        whole.scatter_(1, every[:, rank, :, None].expand_as(part), part)
    return whole


def probe(env: RankEnv, device: torch.device, overrides: list[str]) -> dict[str, float]:
    """The probe's differences of an untrained engine of this layout, the largest over the ranks that hold logits."""
    spec = parse_spec(TINY, overrides=[*overrides, f"resources.gpus_per_node={env.world_size}"])
    dp = env.world_size // (spec.parallel.pp * spec.parallel.tp * spec.parallel.cp)
    spec.parallel.micro_batch_size = GLOBAL_BATCH // (GRAD_ACCUM * dp)
    spec.parallel.grad_accum = GRAD_ACCUM
    engine = build_engine(spec, env, device)
    rows = probe_rows(spec.data.seq_len, spec.model.vocab_size)
    logits = engine_logits(engine, rows, document_ids(rows, EOS))
    keys = ("moved", "perturbed", "alone")
    diffs = probe_diffs(logits) if logits is not None else dict.fromkeys(keys, 0.0)
    found = torch.tensor([diffs[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(found, op=dist.ReduceOp.MAX)
    return dict(zip(keys, found.tolist(), strict=True))


def probe_and_train(env: RankEnv, device: torch.device, overrides: list[str]) -> dict:
    return {"probe": probe(env, device, overrides), **run_case(env, device, overrides)}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:], run=probe_and_train)
