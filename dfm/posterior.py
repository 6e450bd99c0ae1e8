"""The Bayes posterior over experts: P(k | x_<=t) proportional to pi_k prod_s p_k(x_s | x_<s)."""

from __future__ import annotations

import torch
from torch import Tensor


def _masked(token_log_probs: Tensor, mask: Tensor | None) -> Tensor:
    """Zero evidence at padded positions, whatever they hold (a -inf there must not become NaN)."""
    if mask is None:
        return token_log_probs
    return token_log_probs.masked_fill(~mask.bool().unsqueeze(1), 0.0)


def bayes_log_posterior(log_prior: Tensor, token_log_probs: Tensor, mask: Tensor | None = None) -> Tensor:
    """One-shot posterior from per-token log-likelihoods (B, K, T) of a whole prefix. Returns (B, K).

    ``mask`` (B, T) marks the tokens that count (1) and padding (0).
    """
    log_joint = log_prior + _masked(token_log_probs, mask).sum(-1)
    return log_joint - torch.logsumexp(log_joint, dim=-1, keepdim=True)


class BayesPosterior:
    """Running posterior for a batch, updated one token at a time."""

    def __init__(self, log_prior: Tensor, batch_size: int) -> None:
        self.log_joint = log_prior.reshape(1, -1).expand(batch_size, -1).clone()

    def update(self, token_log_probs: Tensor) -> None:
        """Add log p_k(x_t | x_<t) for the newest token, shape (B, K)."""
        self.log_joint = self.log_joint + token_log_probs

    def update_prefix(self, token_log_probs: Tensor, mask: Tensor | None = None) -> None:
        """Add a whole prefix at once: (B, K, T) per-token log-likelihoods, optional mask (B, T)."""
        self.log_joint = self.log_joint + _masked(token_log_probs, mask).sum(-1)

    @property
    def log_posterior(self) -> Tensor:
        return self.log_joint - torch.logsumexp(self.log_joint, dim=-1, keepdim=True)


def prefix_log_posteriors(token_log_probs: Tensor, log_prior: Tensor) -> Tensor:
    """Bayes weights of every prediction of one document: (K, n) per-token log-likelihoods ->
    (n, K) log P(k | x_<t) = log pi_k + sum_{s<t} log p_k(x_s | x_<s), normalised.

    Prediction t is weighted by the evidence of the earlier predictions only (an exclusive
    cumulative sum); prediction 0 (after BOS alone) gets the prior.
    """
    before = torch.cat([torch.zeros_like(token_log_probs[:, :1]), torch.cumsum(token_log_probs[:, :-1], dim=1)], dim=1)
    log_joint = (log_prior.to(token_log_probs).unsqueeze(1) + before).T
    return log_joint - torch.logsumexp(log_joint, dim=-1, keepdim=True)
