"""Data-constrained planning: what repeated tokens are worth, and the model size and epochs a budget should buy when
unique data runs out (Muennighoff et al. 2023, "Scaling Data-Constrained Language Models").

Their law replaces Chinchilla's N and D by effective counts that decay with repetition:

    D' = U_D + U_D·R_D*·(1 − exp(−R_D / R_D*)),   R_D = D / U_D − 1   (epochs beyond the first)
    N' = U_N + U_N·R_N*·(1 − exp(−R_N / R_N*)),   R_N = N / U_N − 1,  U_N = min(N, N_opt(U_D))
    L(N, D, U_D) = E + A / N'^α + B / D'^β

U_D is the unique tokens (all of D when D < U_D: no repetition), N_opt(U_D) the compute-optimal size for U_D tokens
under the same law (parameters beyond it are "repeated" too). With no repetition D' = D and the law is Chinchilla's;
as R_D grows D' approaches U_D·(1 + R_D*): a token of epoch R + 1 is worth exp(−R / R_D*) of a fresh one. The
constants are the paper's fit on C4 (its released code): E = e^0.6254804, A = e^6.255414, B = e^7.3049974,
α = β = 0.3526596, R_D* = 15.387756, R_N* = 5.309743. Its losses are C4 losses of GPT-2-tokenized text: compare plans
with them, don't read them as this corpus's loss.

What the planner warns about, as the paper reports: up to about 4 epochs repeated data is nearly as good as unique
(a 4th-epoch token is worth exp(−3/15.39) = 82% of a fresh one); past that returns fall off; past about 16 epochs
(≈ R_D*, where a token is worth a third of a fresh one and D' has reached 63% of its ceiling) more repetition buys
almost nothing and the compute belongs to a larger model or more data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from orchestrator.errors import UserError

EPOCHS_NEARLY_FREE = 4.0  # repetition up to here is nearly as good as unique data
EPOCHS_WORTHLESS = 16.0  # past here more repetition adds almost nothing


@dataclass(frozen=True)
class DataConstrainedLaw:
    """L(N, D, U) = E + A/N'^α + B/D'^β with the effective counts of the module docstring."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    rd_star: float
    rn_star: float

    def effective_tokens(self, tokens: float, unique: float) -> float:
        """D': the tokens of D = `tokens` trained over `unique` unique ones, counted at what they are worth."""
        unique_used = min(unique, tokens)
        return effective(unique_used, tokens / unique_used - 1, self.rd_star)

    def optimal_params(self, tokens: float) -> float:
        """N_opt(D): the compute-optimal size for D tokens under this law's A, B, α, β."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        return (tokens * g) ** (self.beta / self.alpha) * g

    def effective_params(self, params: float, tokens: float, unique: float) -> float:
        """N': parameters beyond what the unique data can feed count for less, as repeated tokens do."""
        unique_params = min(params, self.optimal_params(min(unique, tokens)))
        return effective(unique_params, params / unique_params - 1, self.rn_star)

    def loss(self, params: float, tokens: float, unique: float) -> float:
        return (self.E + self.A / self.effective_params(params, tokens, unique) ** self.alpha
                + self.B / self.effective_tokens(tokens, unique) ** self.beta)


def effective(unique: float, repeats: float, r_star: float) -> float:
    """U + U·R*·(1 − exp(−R/R*)): `unique` counted once, its `repeats` further passes at a decaying worth."""
    return unique + unique * r_star * -math.expm1(-max(repeats, 0.0) / r_star)


# The paper's fit (its released code's constants, stored as logs there).
MUENNIGHOFF = DataConstrainedLaw(E=math.exp(0.6254804), A=math.exp(6.255414), B=math.exp(7.3049974),
                                 alpha=0.3526596, beta=0.3526596, rd_star=15.387756, rn_star=5.309743)


@dataclass(frozen=True)
class Allocation:
    """A model size and token count for a budget, as the law sees them."""

    params: float
    tokens: float
    unique: float
    loss: float
    effective_tokens: float
    effective_params: float

    @property
    def epochs(self) -> float:
        return self.tokens / self.unique


@dataclass(frozen=True)
class DataPlan:
    """The law's best allocation of a compute budget over a corpus of `unique` tokens, beside Chinchilla's."""

    flops: float
    unique: float
    best: Allocation
    chinchilla: Allocation  # 20 tokens per parameter, judged by the same law
    warnings: list[str] = field(default_factory=list)


def allocate(params: float, tokens: float, unique: float, law: DataConstrainedLaw = MUENNIGHOFF) -> Allocation:
    return Allocation(params=params, tokens=tokens, unique=unique, loss=law.loss(params, tokens, unique),
                      effective_tokens=law.effective_tokens(tokens, unique),
                      effective_params=law.effective_params(params, tokens, unique))


def plan(flops: float, unique: float, law: DataConstrainedLaw = MUENNIGHOFF) -> DataPlan:
    """The size N minimising L(N, C/(6N), U) at C = `flops`: a log-spaced scan over six decades around Chinchilla's
    size, refined by a bounded search between the scan's neighbours of the best point."""
    from scipy.optimize import minimize_scalar

    from orchestrator.planner.scaling import chinchilla_optimal

    if not (flops > 0 and unique > 0 and math.isfinite(flops) and math.isfinite(unique)):
        raise UserError(f"a data-constrained plan needs a positive compute budget and unique-token count; got "
                        f"{flops:g} FLOPs and {unique:g} tokens")
    n_chin, d_chin = chinchilla_optimal(flops)

    def loss_at(log_n: float) -> float:
        n = math.exp(log_n)
        return law.loss(n, flops / (6 * n), unique)

    grid = np.linspace(math.log(n_chin) - 3 * math.log(10), math.log(n_chin) + 3 * math.log(10), 601)
    i = int(np.argmin([loss_at(x) for x in grid]))
    low, high = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    log_n = float(minimize_scalar(loss_at, bounds=(low, high), method="bounded", options={"xatol": 1e-6}).x)
    n = math.exp(log_n)
    best = allocate(n, flops / (6 * n), unique, law)
    return DataPlan(flops=flops, unique=unique, best=best, chinchilla=allocate(n_chin, d_chin, unique, law),
                    warnings=repetition_warnings(best, "the best allocation", law))


def repetition_warnings(allocation: Allocation, what: str, law: DataConstrainedLaw = MUENNIGHOFF) -> list[str]:
    """What the paper says of `allocation`'s repetition: nothing up to 4 epochs, diminishing returns to 16, little
    beyond (the rule of the module docstring)."""
    epochs = allocation.epochs
    if epochs <= EPOCHS_NEARLY_FREE:
        return []
    worth = math.exp(-(epochs - 1) / law.rd_star)
    share = allocation.effective_tokens / allocation.tokens
    line = (f"{what} reads the unique data {epochs:.1f} times: its last epoch's tokens are worth {worth:.0%} of fresh "
            f"ones, all of them together {share:.0%}")
    if epochs <= EPOCHS_WORTHLESS:
        return [f"{line}; past ~{EPOCHS_NEARLY_FREE:g} epochs returns fall off (more unique data would pay)"]
    ceiling = allocation.unique * (1 + law.rd_star)
    return [f"{line}; past ~{EPOCHS_WORTHLESS:g} epochs more repetition buys almost nothing (the effective data "
            f"{allocation.effective_tokens:.3g} tokens is near its ceiling U·(1 + R_D*) = {ceiling:.3g}): spend the "
            "compute on more unique data or fewer steps"]


def unique_tokens(manifest: dict) -> float:
    """The unique training tokens of a shard directory: each source's tokens before mixing repeated any
    (`available_tokens`; `tokens` where the manifest does not say)."""
    sources = manifest.get("sources")
    if not isinstance(sources, dict) or not sources:
        raise UserError("manifest.json: no per-source token counts (sources); give --unique-tokens")
    total = 0.0
    for name, entry in sources.items():
        count = entry.get("available_tokens", entry.get("tokens")) if isinstance(entry, dict) else None
        if not isinstance(count, int | float) or isinstance(count, bool) or count < 0:
            raise UserError(f"manifest.json: sources.{name} has no token count (available_tokens or tokens)")
        total += count
    if total <= 0:
        raise UserError("manifest.json: the sources hold no tokens")
    return total
