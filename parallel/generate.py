"""Sampling continuations from a whole (unsharded) model: greedy, temperature, top-k, top-p, repetition penalty.

    result = generate(model, [[1, 2, 3], [4, 5]], SamplingConfig(max_new_tokens=64, temperature=0.8, top_p=0.9))
    result.tokens, result.tokens_per_second

Prompts of different lengths are left-padded into one batch, so every row's next token sits in the same column and
one forward serves the whole batch; the KV cache's `valid` mask hides the padding. With the cache, the prompt is
run once and each step feeds only the new token: a step costs O(context) instead of re-running O(context²)
attention and every matmul over the whole prefix (`use_cache=False` does exactly that re-run, for comparison).

The order of the logit processors is Hugging Face's (repetition penalty, temperature, top-k, top-p), so a greedy
run with a repetition penalty gives transformers' tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from orchestrator.errors import UserError
from parallel.model import Transformer


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0  # 1: no limit
    repetition_penalty: float = 1.0  # 1: none; > 1 discourages tokens already in the row (CTRL's rule)
    seed: int = 0
    eos_ids: tuple[int, ...] = ()  # a row stops after producing any of them (Llama 3 instruct lists three)

    def check(self) -> None:
        """Every bad value at once, named by its command-line flag."""
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"--max-new-tokens: {self.max_new_tokens}, must be at least 1")
        if self.temperature < 0:
            problems.append(f"--temperature: {self.temperature}, must be ≥ 0 (0 is greedy)")
        if self.top_k < 0:
            problems.append(f"--top-k: {self.top_k}, must be ≥ 0 (0 keeps every token)")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p: {self.top_p}, must be in (0, 1]")
        if self.repetition_penalty <= 0:
            problems.append(f"--repetition-penalty: {self.repetition_penalty}, must be > 0 (1 is none)")
        if problems:
            raise UserError("; ".join(problems))


@dataclass
class Generation:
    tokens: list[list[int]]  # the new tokens of each prompt, up to and including eos
    new_tokens: int  # tokens produced over the batch (rows that stopped count no more)
    seconds: float  # prompt processing and decoding, synchronised with the device
    prefill_seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already in the row less likely: positive logits divided by `penalty`, negative multiplied."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the fewest most likely tokens whose probabilities add up to at least `p` (always the top one)."""
    if p >= 1.0:
        return logits
    ordered, order = torch.sort(logits, dim=-1, descending=True)
    probs = ordered.softmax(-1)
    drop = probs.cumsum(-1) - probs > p  # the mass before a token already reaches p
    drop[..., 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def next_tokens(logits: torch.Tensor, seen: torch.Tensor, config: SamplingConfig,
                generator: torch.Generator) -> torch.Tensor:
    """One token per row from the last position's logits [batch, vocab]."""
    logits = apply_repetition_penalty(logits.float(), seen, config.repetition_penalty)
    if config.temperature == 0:
        return logits.argmax(-1)
    logits = apply_top_p(apply_top_k(logits / config.temperature, config.top_k), config.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], config: SamplingConfig,
             use_cache: bool = True) -> Generation:
    """Continue each prompt by up to `config.max_new_tokens` tokens.

    `model` is a whole `Transformer`, or anything with its `dims`, `new_caches` and full-vocabulary call and a
    `device` (a parallel engine's forward over its shards: `parallel.lm_eval_adapter`)."""
    config.check()
    if not prompts or any(not p for p in prompts):
        raise UserError("every prompt needs at least one token")
    vocab = model.dims.vocab_size
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise UserError(f"a prompt token is outside the model's vocabulary (0..{vocab - 1})")
    device = model.lm_head.weight.device if isinstance(model, Transformer) else model.device
    batch, prompt_len = len(prompts), max(len(p) for p in prompts)
    total = prompt_len + config.max_new_tokens
    tokens = torch.zeros(batch, total, dtype=torch.long, device=device)
    valid = torch.ones(batch, total, dtype=torch.bool, device=device)
    seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, prompt_len - len(prompt):prompt_len] = torch.tensor(prompt, device=device)
        valid[row, :prompt_len - len(prompt)] = False
        seen[row, prompt] = True
    padded = not bool(valid.all())
    generator = torch.Generator(device).manual_seed(config.seed)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    produced = torch.zeros(batch, dtype=torch.long, device=device)

    def forward(end: int, caches) -> torch.Tensor:
        if use_cache:
            start = caches[0].pos
            return model(tokens[:, start:end], caches)[:, -1]
        # No cache: the whole prefix again; a fresh cache only carries the padding mask.
        fresh = model.new_caches(batch, end, valid[:, :end]) if padded else None
        return model(tokens[:, :end], fresh)[:, -1]

    begin = time.perf_counter()
    caches = model.new_caches(batch, total, valid if padded else None) if use_cache else None
    logits = forward(prompt_len, caches)
    _sync(device)
    prefill = time.perf_counter() - begin
    steps = 0
    for steps in range(1, config.max_new_tokens + 1):
        chosen = next_tokens(logits, seen, config, generator)
        chosen = torch.where(done, torch.zeros_like(chosen), chosen)
        tokens[:, prompt_len + steps - 1] = chosen
        produced += (~done).long()
        seen[torch.arange(batch, device=device), chosen] |= ~done
        if config.eos_ids:
            done |= torch.isin(chosen, torch.tensor(config.eos_ids, device=device))
            if bool(done.all()):
                break
        if steps < config.max_new_tokens:
            logits = forward(prompt_len + steps, caches)
    _sync(device)
    seconds = time.perf_counter() - begin
    counts = produced.tolist()
    rows = tokens[:, prompt_len:prompt_len + steps].tolist()
    return Generation(tokens=[r[:n] for r, n in zip(rows, counts, strict=True)], new_tokens=sum(counts),
                      seconds=seconds, prefill_seconds=prefill)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
