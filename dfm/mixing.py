"""Combining experts: mixtures of next-token probabilities, computed in log space.

Shapes: expert log-probs (B, K, V) (or (B, K, N, V) on a masked state), log-weights (B, K).
Weights of -inf mean "not used".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from dfm.errors import DfmError


def normalize_log_weights(log_weights: Tensor) -> Tensor:
    """Renormalise log-weights over experts (last dim)."""
    total = torch.logsumexp(log_weights, dim=-1, keepdim=True)
    _check_some_weight(total)
    return log_weights - total


def _check_some_weight(total: Tensor) -> None:
    if not torch.isfinite(total).all():
        raise DfmError("every expert has zero weight: nothing to mix (check --exclude-expert)")


def mix_log_probs(expert_log_probs: Tensor, log_weights: Tensor) -> Tensor:
    """log sum_k w_k p_k(y): the mixture of probabilities (never of logits).

    ``expert_log_probs`` is (B, K, V) for a next token, or (B, K, N, V) for the clean-token
    posteriors of N positions of a masked state; ``log_weights`` (B, K). Returns the input
    shape without K.
    """
    weights = log_weights.reshape(*log_weights.shape, *([1] * (expert_log_probs.dim() - 2)))
    return torch.logsumexp(expert_log_probs + weights, dim=1)


def uniform_log_prior(num_experts: int) -> Tensor:
    """log(1 / K) for each of K experts (float64)."""
    return torch.full((num_experts,), -math.log(num_experts), dtype=torch.float64)


def check_k(k: int, num_experts: int) -> None:
    """Refuse a number of experts kept per token outside 1..K."""
    if not 1 <= k <= num_experts:
        raise DfmError(f"--k must be between 1 and the number of experts ({num_experts}), got {k}")


def top_k_log_weights(log_weights: Tensor, k: int) -> Tensor:
    """Keep the k largest weights of every row, renormalised; the rest become -inf."""
    num_experts = log_weights.shape[-1]
    check_k(k, num_experts)
    if k == num_experts:
        return normalize_log_weights(log_weights)
    if k == 1:  # the one weight kept renormalises to exactly log 1 = 0
        best = log_weights.topk(1, dim=-1)
        _check_some_weight(best.values)
        return torch.full_like(log_weights, float("-inf")).scatter_(-1, best.indices, 0.0)
    kept = log_weights.topk(k, dim=-1).indices
    masked = torch.full_like(log_weights, float("-inf")).scatter(-1, kept, log_weights.gather(-1, kept))
    return normalize_log_weights(masked)


def exclude_log_weights(log_weights: Tensor, excluded: Sequence[int]) -> Tensor:
    """Give the excluded experts zero weight and renormalise the rest (opt-out at inference)."""
    num_experts = log_weights.shape[-1]
    bad = [e for e in excluded if not 0 <= e < num_experts]
    if bad:
        raise DfmError(f"cannot exclude expert(s) {bad}: experts are numbered 0..{num_experts - 1}")
    if len(set(excluded)) >= num_experts:
        raise DfmError("excluding every expert leaves nothing to generate with; exclude fewer")
    if not excluded:
        return normalize_log_weights(log_weights)
    masked = log_weights.clone()
    masked[..., list(excluded)] = float("-inf")
    return normalize_log_weights(masked)
