"""The absorbing-state (masked) mixture path of any-order discrete flow matching.

At time t every token of a clean sequence x1 is x1 with probability kappa(t) and the mask
symbol M otherwise, independently: X_0 is all masks, X_1 = x1. A masked token is revealed at
rate d_kappa / (1 - kappa), to a value drawn from the model's posterior p(x1_i | X_t), so the
velocity at a masked position is d_kappa / (1 - kappa) (p(. | X_t) - delta_M) and zero at a
revealed one. Symbols are the V tokens plus M = V.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dfm.schedulers import Scheduler


class MaskedPath:
    """Masked path over a vocabulary of ``vocab_size`` tokens with the schedule ``scheduler``."""

    def __init__(self, vocab_size: int, scheduler: Scheduler) -> None:
        if vocab_size < 1:
            raise ValueError("vocab_size must be positive")
        self.vocab_size = vocab_size
        self.mask_id = vocab_size
        self.scheduler = scheduler

    def sample(self, x1: Tensor, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """X_t for clean sequences ``x1`` (B, N) at times ``t`` (B,): each token kept with probability kappa(t)."""
        keep_prob = self.scheduler.kappa(t.to(torch.float64)).reshape(-1, 1)
        draw = torch.rand(x1.shape, generator=generator, dtype=torch.float64, device=x1.device)
        return torch.where(draw < keep_prob, x1, torch.full_like(x1, self.mask_id))

    def loss_weight(self, t: Tensor) -> Tensor:
        """d_kappa / (1 - kappa): the ELBO weight of a masked token's cross-entropy at time t."""
        return self.scheduler.d_kappa(t) / (1 - self.scheduler.kappa(t))

    def velocity(self, probs: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """u_t on V + 1 symbols (B, N, V + 1) from posteriors ``probs`` (B, N, V) at state ``xt`` (B, N)."""
        u = torch.nn.functional.pad(probs, (0, 1))
        u[..., self.mask_id] -= 1.0
        masked = (xt == self.mask_id).unsqueeze(-1)
        return torch.where(masked, self.loss_weight(t).reshape(-1, 1, 1) * u, torch.zeros_like(u))

    def reveal_probability(self, t: Tensor, s: Tensor) -> Tensor:
        """Probability that a token masked at time t is revealed by time s > t:
        (kappa(s) - kappa(t)) / (1 - kappa(t))."""
        kappa_t = self.scheduler.kappa(t)
        return (self.scheduler.kappa(s) - kappa_t) / (1 - kappa_t)
