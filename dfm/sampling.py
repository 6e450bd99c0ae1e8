"""Token sampling from (mixture) log-probabilities: temperature, top-k and top-p filtering."""

from __future__ import annotations

import torch
from torch import Tensor


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
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 0")
    if temperature == 0:
        return log_probs.argmax(-1)
    probs = filter_log_probs(log_probs.float(), temperature, top_k, top_p).exp()
    device = generator.device if generator is not None else probs.device
    drawn = torch.multinomial(probs.to(device), 1, generator=generator).squeeze(-1)
    return drawn.to(log_probs.device)
