"""Token sampling from (mixture) log-probabilities: temperature, top-k and top-p filtering."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dfm.errors import DfmError

#: The largest seed dfm accepts (run seeds and sampling seeds alike). torch generators take 64-bit
#: seeds, and a run's models are seeded at the run's seed plus offsets (tens of thousands), so the
#: range [0, 2^63 - 1] leaves every derived seed inside 64 bits.
MAX_SEED = 2**63 - 1


def check_seed(seed: object, name: str) -> None:
    """Refuse a ``seed`` (called ``name`` in the message) that is not an integer in [0, MAX_SEED]."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise DfmError(f"{name} must be an integer from 0 to 2^63 - 1 ({MAX_SEED}), got {seed!r}")


#: The smallest temperature above 0: float32 holds it, and log-probabilities down to -3e8 divided
#: by it stay finite.
MIN_TEMPERATURE = 1e-30


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Refuse a temperature that is not a finite number >= 0, a top-p outside (0, 1] and a negative
    top-k; NaN fails every comparison, so it is refused too."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise DfmError(f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if 0 < temperature < MIN_TEMPERATURE:  # float32 rounds it to 0, and log-probs / 0 are NaN
        raise DfmError(f"--temperature {temperature} is greedy in effect: use 0, or at least {MIN_TEMPERATURE}")
    if not 0 < top_p <= 1:
        raise DfmError(f"--top-p must lie in (0, 1] (1 = off), got {top_p}")
    if top_k < 0:
        raise DfmError(f"--top-k must be >= 0 (0 = off), got {top_k}")


def filter_log_probs(log_probs: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Tempered, truncated and renormalised log-probabilities (B, V). ``temperature`` must be > 0."""
    if temperature == 1.0 and top_k == 0 and top_p >= 1.0:
        return log_probs  # already normalised: nothing to filter
    scores = log_probs / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the best token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return torch.log_softmax(scores, dim=-1)


def sample_tokens(
    log_probs: Tensor,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> Tensor:
    """Draw one token per row; ``temperature == 0`` means greedy (argmax)."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return log_probs.argmax(-1)
    probs = filter_log_probs(log_probs.float(), temperature, top_k, top_p).exp()
    device = generator.device if generator is not None else probs.device
    drawn = torch.multinomial(probs.to(device), 1, generator=generator).squeeze(-1)
    return drawn.to(log_probs.device)
