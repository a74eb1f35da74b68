"""Per-document attention over packed rows (`parallel.documents`, model.attention_mask / rope_positions).

One process: a token's logits do not depend on the other documents of its row and equal those of its document run
alone; compiled and checkpointed blocks give the eager gradients. Two ranks (one torchrun launch of
documents_worker.py): the same probes under native tp2, pp2 (1F1B, and zero-bubble: two stages per rank, split
backward), FSDP and cp2 (documents crossing the chunks' borders), and training with document masks under those and
DeepSpeed tp2 matches one process.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch._dynamo.testing import CompileCounterWithBackend

import parallel.documents
from orchestrator.cli import main
from orchestrator.errors import CheckpointError, SpecError
from orchestrator.spec import spec_to_yaml
from orchestrator.validate import parse_spec
from parallel.activation_checkpoint import apply_activation_checkpointing
from parallel.compile import apply_compile
from parallel.documents import balanced_positions, dense_mask, document_ids, document_positions, head_tail_positions
from parallel.generate import SamplingConfig, generate
from parallel.loader import ShardLoader
from parallel.model import build_model, cross_entropy
from parallel.restore import check_same_model
from tests.helpers import (
    PARAM_ATOL,
    REPO,
    RTOL,
    assert_compiled_as_eager,
    losses,
    pretrain_train,
    reference_run,
    run_layout,
)
from tests.parallel.documents_worker import ENDS, probe_diffs, probe_rows
from tests.parallel.layout_worker import EOS, TINY
from tests.shards import EOS as SHARD_EOS
from tests.shards import write_shards

DOCUMENT = ["model.attention_mask=document", "model.rope_positions=document"]
GEMMA_LIKE = ["model.attn_softcap=20", "model.sliding_window=6", "model.full_attention_every=2"]
RUN = ["data.seq_len=32", "schedule.steps=3", "optim.eps=1e-5"]
NATIVE, DEEPSPEED = "parallel.backend=native", "parallel.backend=deepspeed"
CASES = {
    "native-tp2": [*RUN, *DOCUMENT, NATIVE, "parallel.tp=2", "parallel.sequence_parallel=true"],
    "native-pp2": [*RUN, *DOCUMENT, *GEMMA_LIKE, NATIVE, "parallel.pp=2", "parallel.grad_accum=2"],
    "native-pp2-zero-bubble": [*RUN, *DOCUMENT, NATIVE, "parallel.pp=2", "parallel.grad_accum=2",
                               "parallel.pp_schedule=zero_bubble"],
    "native-fsdp2": [*RUN, *DOCUMENT, NATIVE, "parallel.zero_stage=3"],
    "native-cp2": [*RUN, *DOCUMENT, NATIVE, "parallel.cp=2"],
    "deepspeed-tp2": [*RUN, *DOCUMENT, DEEPSPEED, "parallel.tp=2"],
}


def tiny(*overrides: str, seed: int = 5) -> torch.nn.Module:
    spec = parse_spec(TINY, overrides=[*RUN, *overrides])
    model = build_model(spec.model, "cpu")
    model.init_weights(seed)
    return model


def test_document_ids_and_positions_come_from_eos() -> None:
    """An EOS ends its document; the token after it starts the next one."""
    tokens = torch.tensor([[5, 6, EOS, 7, EOS, EOS, 8, 9]])
    docs = document_ids(tokens, EOS)
    assert docs.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]
    assert document_positions(docs).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    mask = dense_mask(docs, 0)[0, 0]
    assert mask[3].tolist() == [False, False, False, True, False, False, False, False]
    assert mask[7].tolist() == [False] * 6 + [True, True]


def packed_documents(rows: int, seq: int, mean: float, seed: int) -> torch.Tensor:
    """[rows, seq] document ids of rows packed with documents of exponentially distributed lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.empty(rows * seq).exponential_(1 / mean, generator=g).long() + 1
    starts = torch.zeros(rows * seq, dtype=torch.int64)
    starts[lengths.cumsum(0)[lengths.cumsum(0) < rows * seq]] = 1
    return starts.view(rows, seq).cumsum(-1)


def keys_attended(documents: torch.Tensor, every: torch.Tensor) -> torch.Tensor:
    """[rows, ranks]: how many keys each cp rank's queries attend under per-document masks."""
    work = document_positions(documents) + 1
    return torch.stack([work.gather(1, every[:, r]).sum(-1) for r in range(every.shape[1])], 1)


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_a_cp_split_under_document_masks_gives_every_rank_the_same_attention_work(cp: int) -> None:
    """Head-tail balances one causal stream; with documents the busiest rank's keys are the measure of the step."""
    seq = 8192
    documents = packed_documents(6, seq, mean=seq / 4, seed=cp)
    every = balanced_positions(documents, cp)
    assert every.shape == (6, cp, seq // cp)
    for row in every:
        assert torch.equal(row.flatten().sort().values, torch.arange(seq))
        assert all(torch.equal(held, held.sort().values) for held in row)
    imbalance = {}
    for name, split in {"balanced": every, "head-tail": head_tail_positions(seq, cp).expand(6, -1, -1)}.items():
        work = keys_attended(documents, split).double()
        imbalance[name] = (work.max(1).values / work.mean(1)).max().item()
    assert imbalance["balanced"] < 1.05 < imbalance["head-tail"], imbalance
    one_document = keys_attended(torch.zeros(1, seq, dtype=torch.int64),
                                 balanced_positions(torch.zeros(1, seq, dtype=torch.int64), cp))
    assert (one_document == one_document[0, 0]).all(), "one causal stream: every rank attends as many keys"


@pytest.mark.parametrize("window", [0, 5])
def test_a_split_mask_is_the_whole_rows_mask_at_its_queries_and_keys(window: int) -> None:
    documents = packed_documents(2, 32, mean=6, seed=0)
    every = balanced_positions(documents, 2)
    queries, keys = every[:, 1], every.flatten(1)
    whole = dense_mask(documents, window)
    expected = torch.stack([whole[b, 0][queries[b]][:, keys[b]] for b in range(2)])[:, None]
    assert torch.equal(dense_mask(documents, window, queries, keys), expected)


@pytest.mark.parametrize("extra", [[], GEMMA_LIKE], ids=["llama", "gemma-like"])
def test_a_documents_logits_depend_on_it_alone(extra: list[str]) -> None:
    """Changing the first document leaves the others' logits exactly as they were, and a document inside the pack
    gets the logits of it run alone (document RoPE positions: up to float rounding of the different shapes)."""
    model = tiny(*DOCUMENT, *extra)
    rows = probe_rows(32, TINY["model"]["vocab_size"])
    with torch.no_grad():
        logits = model(rows, documents=document_ids(rows, EOS))
        alone = model(rows[:1, ENDS[0] + 1:ENDS[1] + 1])
    diffs = probe_diffs(logits)
    assert diffs["moved"] == 0.0 and diffs["perturbed"] > 1e-3, diffs
    assert diffs["alone"] < 1e-6, diffs
    torch.testing.assert_close(logits[0, ENDS[0] + 1:ENDS[1] + 1], alone[0], rtol=0, atol=1e-6)


def test_sequence_positions_and_the_default() -> None:
    """With RoPE positions counted over the row, a document's logits equal its own run alone up to rounding
    (rotary scores depend only on distances), not bit for bit; the default causal model ignores document ids."""
    rows = probe_rows(32, TINY["model"]["vocab_size"])
    masked = tiny("model.attention_mask=document")
    causal = tiny()
    with torch.no_grad():
        logits = masked(rows, documents=document_ids(rows, EOS))
        alone = masked(rows[:1, ENDS[0] + 1:ENDS[1] + 1])
        assert torch.equal(causal(rows, documents=document_ids(rows, EOS)), causal(rows))
        plain = causal(rows)
    assert probe_diffs(logits)["moved"] == 0.0
    torch.testing.assert_close(logits[0, ENDS[0] + 1:ENDS[1] + 1], alone[0], rtol=0, atol=1e-5)
    assert probe_diffs(plain)["moved"] > 1e-3, "without document masks the other documents see the change"


def test_compiled_checkpointed_blocks_mask_as_eager_ones() -> None:
    """Document masks and positions pass through selective activation checkpointing (whose recomputation the mask
    must survive; full and every_n wrap the block the same way, by a non-reentrant checkpoint of its forward) and
    compiled blocks, with no graph break."""
    rows = probe_rows(33, TINY["model"]["vocab_size"])

    def loss_and_grads(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = cross_entropy(model(rows[:, :-1], documents=document_ids(rows[:, :-1], EOS)), rows[:, 1:])
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    want = loss_and_grads(tiny(*DOCUMENT, *GEMMA_LIKE))
    model = tiny(*DOCUMENT, *GEMMA_LIKE)
    apply_activation_checkpointing(model.layers, "selective")
    counter = CompileCounterWithBackend("aot_eager_decomp_partition")
    apply_compile(model.layers, backend=counter)
    assert_compiled_as_eager(counter, loss_and_grads(model), want)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("document-layouts")
    (tmp / "cases.json").write_text(json.dumps(CASES))
    worker = REPO / "tests" / "parallel" / "documents_worker.py"
    return run_layout(2, ["--cases", str(tmp / "cases.json")], tmp / "results.pt", tmp, worker=worker)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("native")])
def test_documents_are_independent_under_the_layout(case: str, layouts: dict) -> None:
    """Under tp2 (each rank's vocabulary shard), pp2 (the last stage's logits, document ids sent to every stage
    through the schedule) and cp2 (each rank's chunks, their logits gathered) a document's logits ignore the others
    and equal its own at a row's start."""
    diffs = layouts[case]["probe"]
    assert diffs["moved"] == 0.0 and diffs["perturbed"] > 1e-3, diffs
    assert diffs["alone"] < 1e-6, diffs


@pytest.fixture(scope="module")
def references() -> dict[tuple[str, ...], dict]:
    return {}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_document_masked_training_matches_one_process(case: str, layouts: dict, references: dict) -> None:
    got = layouts[case]
    single = tuple(o for o in CASES[case] if not o.startswith("parallel."))
    if single not in references:
        references[single] = reference_run(list(single))
    expected = references[single]
    assert expected["losses"][-1] < expected["losses"][0], "the reference run should learn"
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(expected["losses"]), rtol=RTOL, atol=0)
    for name, value in expected["params"].items():
        torch.testing.assert_close(got["params"][name], value, rtol=0, atol=PARAM_ATOL,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(("overrides", "match"), [
    (["model.rope_positions=document"], r"model.rope_positions: document restarts positions .* needs "
                                        r"model.attention_mask=document"),
    (["model.attention_mask=document", DEEPSPEED, "parallel.pp=2", "parallel.grad_accum=2"],
     r"model.attention_mask: document under parallel.pp=2 needs parallel.backend=native"),
    (["model.attention_mask=document", "parallel.pp=2", "parallel.grad_accum=2", "model.tie_embeddings=true"],
     r"native cannot tie embeddings under pp > 1"),
    (["model.attention_mask=documents"], r"model.attention_mask.*causal.*document"),
])
def test_refused_document_settings_name_the_field(overrides: list[str], match: str) -> None:
    with pytest.raises(SpecError, match=match):
        parse_spec(TINY, overrides=[*overrides, "resources.gpus_per_node=2"])


def _walk_documents(row: list[int], eos: int) -> tuple[list[int], list[int]]:
    """Document ids and positions by a plain walk over one row (the rule the loader's vector form follows)."""
    ids, positions, doc, pos = [], [], 0, 0
    for token in row:
        ids.append(doc)
        positions.append(pos)
        doc, pos = (doc + 1, 0) if token == eos else (doc, pos + 1)
    return ids, positions


def test_the_loader_derives_documents_from_eos_and_resumes_exactly(tmp_path) -> None:
    """Real shards: the ids and positions follow the rows' EOS tokens; everything else the loader returns, its
    state and a resume are as without them."""
    shards = str(write_shards(tmp_path, seq_len=128, rows=48, rows_per_shard=16, sources=("fortunes",)))
    args = dict(seq_len=128, micro_batch_size=2, grad_accum=2, seed=3, prefetch=0)
    plain, masked = ShardLoader(shards, **args), ShardLoader(shards, documents=True, **{**args, "prefetch": 2})
    steps = []
    for _ in range(4):
        for a, b in zip(plain.next_step(), masked.next_step(), strict=True):
            assert a.documents is None and torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
            assert torch.equal(a.sample_ids, b.sample_ids)
            for row, ids, positions in zip(b.inputs.tolist(), b.documents.tolist(), b.positions.tolist(),
                                           strict=True):
                assert (ids, positions) == _walk_documents(row, SHARD_EOS)
            steps.append(b.documents)
        if len(steps) == 4:
            state = masked.state_dict()
    assert plain.state_dict() == masked.state_dict()
    assert max(int(d.max()) for d in steps) >= 2, "rows of short documents should hold several"
    resumed = ShardLoader(shards, documents=True, **args)
    resumed.load_state_dict(state)
    again = [mb.documents for _ in range(2) for mb in resumed.next_step()]
    assert len(again) == len(steps[4:]) and all(torch.equal(x, y) for x, y in zip(again, steps[4:], strict=True))
    masked.close()


def test_a_checkpoint_resumes_with_document_masks_switched_on(tmp_path) -> None:
    """The mask and the positions say how rows are read, not what the weights are: a causal run's checkpoint
    resumes under document masking, while a changed weight shape is still refused."""
    path = tmp_path / "spec.yaml"
    path.write_text(spec_to_yaml(parse_spec(TINY)))
    check_same_model(str(path), parse_spec(TINY, overrides=DOCUMENT))
    with pytest.raises(CheckpointError, match=r"model.dim: 64 in the checkpoint, 32 now"):
        check_same_model(str(path), parse_spec(TINY, overrides=[*DOCUMENT, "model.dim=32"]))


def test_a_document_masked_model_generates_each_prompt_as_its_own_document() -> None:
    """Generation feeds one prompt per row: batched prompts of different lengths (left-padded) continue exactly as
    each alone, and the cached decoding's next-token logits are those of the document-masked forward."""
    model = tiny(*DOCUMENT)
    prompts = [[5, 9, 13, 2, 7], [40, 41, 42]]
    config = SamplingConfig(max_new_tokens=6, temperature=0.0)
    together = generate(model, prompts, config)
    alone = [generate(model, [p], config).tokens[0] for p in prompts]
    assert together.tokens == alone
    row = torch.tensor([prompts[0] + alone[0][:-1]])
    with torch.no_grad():
        full = model(row, documents=document_ids(row, EOS))
    assert full[0, len(prompts[0]) - 1:].argmax(-1).tolist() == alone[0]


@pytest.mark.slow
def test_the_flex_attention_path_gives_the_boolean_masks_numbers(monkeypatch) -> None:
    """The CUDA path (a FlexAttention block mask, compiled flex_attention with the soft cap as score_mod, grouped
    query heads, sliding windows), compiled here by inductor for the CPU, gives the SDPA path's logits."""
    model = tiny(*DOCUMENT, *GEMMA_LIKE)
    rows = probe_rows(32, TINY["model"]["vocab_size"])[:2]
    documents = document_ids(rows, EOS)
    with torch.no_grad():
        want = model(rows, documents=documents)
        monkeypatch.setattr(parallel.documents, "use_flex_attention", lambda device: True)
        assert not isinstance(model.documents(documents).mask(0), torch.Tensor)
        got = model(rows, documents=documents)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_the_cli_refuses_positions_without_masks_with_exit_code_2(tmp_path, capsys) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(TINY))
    assert main(["validate", str(path), "model.rope_positions=document"]) == 2
    err = capsys.readouterr().err
    assert "pretrain validate: " in err and "model.rope_positions: document restarts positions" in err


@pytest.mark.slow
def test_pretrain_train_reads_documents_from_the_shards(tmp_path) -> None:
    """`pretrain train` on real shards of short documents: with document masks the loop's first loss (same weights,
    same rows) differs from the causal run's, so the loader's ids reach the forward, and both runs learn."""
    shards = write_shards(tmp_path / "shards", seq_len=64, rows=120, rows_per_shard=40, sources=("fortunes",))
    first = {}
    for mask in ("causal", "document"):
        done = pretrain_train(1, tmp_path, f"data.path={shards}", "parallel.backend=native", "schedule.steps=4",
                              "resources.gpus_per_node=1", f"checkpoint.dir={tmp_path}/{mask}",
                              f"model.attention_mask={mask}",
                              f"model.rope_positions={'document' if mask == 'document' else 'sequence'}")
        assert done.returncode == 0, done.stderr[-3000:]
        steps = losses(done.stdout + done.stderr)
        assert sorted(steps) == [1, 2, 3, 4] and steps[4] < steps[1], steps
        first[mask] = steps[1]
    assert abs(first["document"] - first["causal"]) > 1e-3, first
