"""lm-evaluation-harness over our model: a whole one in this process, or a training engine's, in its layout.

    lm = PretrainLM(EngineModel(engine), tokenizer_json, eos_id=256, max_length=2048)   # on every rank
    lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"], limit=100, task_manager=...)

`PretrainLM` implements the harness's three request types the way its Hugging Face backend (HFLM) does, so the
numbers are the same: a (context, continuation) pair is encoded whole and split where the context's tokens end,
trailing spaces of the context moved to the continuation (`TemplateLM`); its log-likelihood is the sum of the
continuation's log-softmax in fp32 over one forward of `(context + continuation)[:-1]`, left-truncated to
`max_length`; rolling log-likelihoods score the harness's disjoint windows; generation is greedy (or sampled) with
the KV cache of `parallel.generate`, cut at the first stop sequence.

Requests are sorted by length and batched (right padding: a causal model's real positions never see it). Under
data parallelism every rank holds the same request list (the harness builds it identically everywhere), takes every
dp-th batch and the results are all-gathered over the dp group; batches go round by round, a rank without a batch in
a round running a one-token stand-in, so the collectives inside a sharded forward (FSDP, ZeRO-3) pair up. Tensor
parallel peers run each batch together, and their vocabulary-sharded logits are all-gathered. Pipeline layouts run a
schedule rather than a forward and are not served (`pretrain eval` evaluates their checkpoints in another layout).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tokenizers import Tokenizer

from orchestrator.errors import UserError
from parallel.generate import SamplingConfig, generate
from parallel.model import KVCache, ModelDims, Transformer

DEFAULT_MAX_GEN_TOKS = 256  # HFLM's


class ScoringModel(Protocol):
    """What the adapter needs of a model: full-vocabulary logits and a decoder for `parallel.generate`."""

    dims: ModelDims
    device: torch.device
    dp: int  # data-parallel ranks the requests are split over
    dp_rank: int
    dp_group: Any

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """[batch, seq, vocab] fp32 logits of a forward over `tokens` [batch, seq]."""
        ...

    def decoder(self) -> Any:
        """What `parallel.generate.generate` calls: the model, or a stand-in with its interface."""
        ...

    def end_forwards(self) -> None:
        """Free what a series of forwards left gathered."""
        ...


class WholeModel:
    """A whole `Transformer` in this process (`pretrain eval` of a Hugging Face directory, tests)."""

    dp, dp_rank, dp_group = 1, 0, None

    def __init__(self, model: Transformer):
        self.model, self.dims, self.device = model, model.dims, model.lm_head.weight.device

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens).float()

    def decoder(self) -> Transformer:
        return self.model

    def end_forwards(self) -> None:
        pass


class EngineModel:
    """A training engine's live model in its layout: every rank of the run calls the adapter together."""

    def __init__(self, engine: Any):
        d = engine.dims
        if d.pp > 1:
            raise UserError(f"downstream evaluation runs a plain forward, which a pipeline layout (parallel.pp="
                            f"{d.pp}) does not have; evaluate its checkpoints with `pretrain eval` (any other layout)")
        self.engine, self.dims, self.device = engine, engine.model_dims, engine.device
        self.dp, self.dp_rank = d.dp, d.dp_rank
        self.dp_group = d.group("dp") if d.dp > 1 else None
        self.tp, self.tp_group = d.tp, d.group("tp") if d.tp > 1 else None
        p = engine.spec.parallel
        self.sequence_parallel = p.sequence_parallel and d.tp > 1
        self.cache_dtype = torch.bfloat16 if p.precision == "bf16" else torch.float32

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        length = tokens.shape[1]
        pad = -length % self.tp if self.sequence_parallel else 0
        if pad:
            # Sequence parallelism splits the sequence over the tp ranks: padded on the right, which no real
            # position attends to; the caches then step back over the padding, which the next tokens overwrite.
            tokens = torch.nn.functional.pad(tokens, (0, pad))
        local = self.engine.forward_logits(tokens, caches)
        if pad and caches is not None:
            for cache in caches:
                cache.pos -= pad
        if self.tp > 1:
            parts = [torch.empty_like(local) for _ in range(self.tp)]
            dist.all_gather(parts, local.contiguous(), group=self.tp_group)
            local = torch.cat(parts, dim=-1)
        return local[:, :length].float()

    __call__ = logits  # the decoder's call, as `generate` makes it

    def new_caches(self, batch: int, max_len: int, valid: torch.Tensor | None = None) -> list[KVCache]:
        """One cache per layer, holding this rank's key/value heads in the dtype the forward computes in (with
        room for the padding of a sequence-parallel step)."""
        room = self.tp - 1 if self.sequence_parallel else 0
        if room and valid is not None:
            valid = torch.nn.functional.pad(valid, (0, room), value=True)
        max_len += room
        d = self.dims
        return [KVCache(batch, d.n_kv_heads // self.tp, d.head_dim, max_len, self.cache_dtype, self.device, valid)
                for _ in range(d.n_layers)]

    def decoder(self) -> EngineModel:
        return self

    def end_forwards(self) -> None:
        self.engine.end_forwards()


class PretrainLM(TemplateLM):
    """The harness's `LM` over a `ScoringModel`, tokenizing with the run's tokenizer.json."""

    def __init__(self, model: ScoringModel, tokenizer_json: str, eos_id: int, max_length: int,
                 batch_size: int = 16, bos_id: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 seed: int = 0):
        super().__init__()
        self.model, self.max_length, self.batch_size = model, max_length, batch_size
        self._tokenizer = Tokenizer.from_file(tokenizer_json)
        self._eos_id, self._bos_id = eos_id, bos_id
        self._max_gen_toks, self._seed = max_gen_toks, seed

    @property
    def eot_token_id(self) -> int:
        return self._eos_id

    @property
    def prefix_token_id(self) -> int:
        return self._eos_id if self._bos_id is None else self._bos_id

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        if add_special_tokens is None:
            # As HFLM: the tokenizer's own special tokens, unless the text already starts with the prefix token.
            add_special_tokens = not string.startswith(self.tok_decode([self.prefix_token_id], False))
        return self._tokenizer.encode(string, add_special_tokens=add_special_tokens).ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------------------------ scoring

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether greedy decoding would produce it) per request."""
        pairs = []
        for _, context, continuation in requests:
            whole = (context + continuation)[-(self.max_length + 1):]
            pairs.append((whole[:-1], continuation))

        def score(batch: list[int] | None, _: list[list[int]]) -> list[tuple[float, bool]]:
            rows = [pairs[i] for i in batch] if batch else [([self.prefix_token_id], [])]
            width = max(len(inp) for inp, _ in rows)
            tokens = torch.zeros(len(rows), width, dtype=torch.long, device=self.model.device)
            for r, (inp, _) in enumerate(rows):
                tokens[r, :len(inp)] = torch.tensor(inp)
            logprobs = self.model.logits(tokens).log_softmax(-1)
            out = []
            for r, (inp, cont) in enumerate(rows):
                target = torch.tensor(cont, device=logprobs.device)
                own = logprobs[r, len(inp) - len(cont):len(inp)]
                picked = own.gather(-1, target[:, None]).squeeze(-1)
                out.append((float(picked.sum()), bool((own.argmax(-1) == target).all())))
            return out

        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]))
        return self._spread(order, score)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihoods (perplexity tasks): the sum over the harness's disjoint windows of max_length."""
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows), strict=True):
            totals[owner] += logprob
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when a task asks) continuations with the KV cache, cut at the task's stop strings."""
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        jobs = []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            new = kwargs.pop("max_gen_toks")
            keep = self.max_length - new
            if keep <= 0:
                raise UserError(f"a task asks for {new} generated tokens, not less than the model's context "
                                f"({self.max_length})")
            jobs.append((self.tok_encode(context)[-keep:], new, float(kwargs.get("temperature", 0.0)), until))
        # A batch shares its temperature; sorted by length, longest first.
        order = sorted(range(len(jobs)), key=lambda i: (jobs[i][2], -len(jobs[i][0])))
        # Early stop at eos only where no peer's forwards must pair up with this rank's.
        stop_at_eos = (self.eot_token_id,) if self.model.dp == 1 else ()

        def run(batch: list[int] | None, peers: list[list[int]]) -> list[str]:
            longest = max(jobs[i][1] for b in peers for i in b)  # every rank of the round decodes as long
            prompts = [jobs[i][0] or [self.prefix_token_id] for i in batch] if batch else [[self.prefix_token_id]]
            temperature = jobs[batch[0]][2] if batch else 0.0
            config = SamplingConfig(max_new_tokens=longest, temperature=temperature, seed=self._seed,
                                    eos_ids=stop_at_eos)
            tokens = generate(self.model.decoder(), prompts, config).tokens
            texts = []
            for i, row in zip(batch or [], tokens, strict=False):
                row = row[:jobs[i][1]]
                if self.eot_token_id in row:
                    row = row[:row.index(self.eot_token_id)]
                texts.append(postprocess_generated_text(generation=self.tok_decode(row), stop=jobs[i][3],
                                                        think_end_token=None))
            return texts

        return self._spread(order, run, by=lambda i: jobs[i][2])

    # ------------------------------------------------------------------------------------------ distribution

    def _spread(self, order: list[int], work: Callable[[list[int] | None, list[list[int]]], list[Any]],
                by: Callable[[int], Any] = lambda i: None) -> list[Any]:
        """`work` over batches of the requests in `order` (each batch one value of `by`), spread over the
        data-parallel ranks round by round; the results in the requests' own order, on every rank.

        `work(batch, peers)` gets its batch (None: a stand-in, to pair up collectives) and the batches of the
        whole round."""
        batches: list[list[int]] = []
        for i in order:
            if batches and len(batches[-1]) < self.batch_size and by(batches[-1][0]) == by(i):
                batches[-1].append(i)
            else:
                batches.append([i])
        dp, rank = self.model.dp, self.model.dp_rank
        mine = []
        for first in range(0, math.ceil(len(batches) / dp) * dp, dp):
            peers = batches[first:first + dp]
            batch = batches[first + rank] if first + rank < len(batches) else None
            results = work(batch, peers)
            if batch is not None:
                mine.append(results)
        self.model.end_forwards()
        everyone = [mine]
        if dp > 1:
            everyone = [None] * dp
            dist.all_gather_object(everyone, mine, group=self.model.dp_group)
        results: list[Any] = [None] * len(order)
        for j, batch in enumerate(batches):
            for i, result in zip(batch, everyone[j % dp][j // dp], strict=True):
                results[i] = result
        return results
