"""Probability paths over sequences (``ProbPath``), and the discrete-time path of autoregressive
generation (``ARPath``; the masked path is dfm/masked_path.py).

State X_t = (x_1..x_t, M..M): the first t positions revealed, the rest masked with the extra
symbol M. Step t -> t+1 reveals position t+1, and its probability velocity is
u_t(y | X_t) = p(x_{t+1} = y | x_<=t) - delta_M(y): the kernel delta_{X_t} + u_t is next-token
sampling. Velocities live on V + 1 symbols, M being the last one.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class ProbPath(Protocol):
    """A path from all-masked states to clean sequences over ``vocab_size`` tokens and the mask
    ``mask_id`` = vocab_size: ``sample`` draws X_t given clean sequences, ``velocity`` is u_t on
    V + 1 symbols at every position of a state from the model's posteriors there."""

    vocab_size: int
    mask_id: int

    def sample(self, x1: Tensor, t: Tensor, generator: torch.Generator | None = None) -> Tensor: ...

    def velocity(self, probs: Tensor, xt: Tensor, t: Tensor) -> Tensor: ...


class ARPath:
    """Left-to-right reveal path over sequences of ``length`` tokens from a vocabulary of ``vocab_size``."""

    def __init__(self, length: int, vocab_size: int) -> None:
        if length < 1 or vocab_size < 1:
            raise ValueError("length and vocab_size must be positive")
        self.length = length
        self.vocab_size = vocab_size
        self.mask_id = vocab_size

    def schedule(self) -> Tensor:
        """Position revealed at each step: step t reveals position t (0-based)."""
        return torch.arange(self.length)

    def sample(self, x1: Tensor, t: int | Tensor, generator: torch.Generator | None = None) -> Tensor:
        """X_t for a batch of complete sequences ``x1`` (B, N): positions >= t are masked (no
        randomness: ``generator`` is there for the ``ProbPath`` signature)."""
        t = torch.as_tensor(t, device=x1.device).reshape(-1, 1)
        revealed = torch.arange(x1.shape[-1], device=x1.device) < t
        return torch.where(revealed, x1, torch.full_like(x1, self.mask_id))

    def velocity(self, probs: Tensor, xt: Tensor, t: int | Tensor) -> Tensor:
        """u_t on V + 1 symbols (B, N, V + 1) at state ``xt`` (B, N): at position t, the next-token
        probabilities ``probs[:, t]`` (``probs`` (B, N, V)) minus delta_M; zero elsewhere."""
        u = torch.nn.functional.pad(probs, (0, 1))
        u[..., self.mask_id] -= 1.0
        t = torch.as_tensor(t, device=xt.device).reshape(-1, 1)
        revealed_next = (torch.arange(xt.shape[-1], device=xt.device) == t).unsqueeze(-1)
        return torch.where(revealed_next, u, torch.zeros_like(u))

    def transition(self, velocity: Tensor) -> Tensor:
        """The one-step kernel delta_{X_t}(position t+1) + u_t: a distribution over V + 1 symbols."""
        kernel = velocity.clone()
        kernel[..., self.mask_id] += 1.0
        return kernel


def check_velocity(u: Tensor, current: Tensor, atol: float = 1e-5) -> None:
    """Raise ValueError unless ``u`` (..., S) is a valid probability velocity at state ``current`` (...).

    Valid: every row sums to zero, entries lie in [-1, 1], and entries off the current state are
    non-negative (mass can only leave the current state).
    """
    if not torch.allclose(u.sum(-1), torch.zeros((), dtype=u.dtype, device=u.device), atol=atol):
        raise ValueError("velocity rows must sum to zero")
    if (u < -1 - atol).any() or (u > 1 + atol).any():
        raise ValueError("velocity entries must lie in [-1, 1]")
    off_state = torch.ones_like(u, dtype=torch.bool).scatter(-1, current.unsqueeze(-1), False)
    if (u[off_state] < -atol).any():
        raise ValueError("velocity must be non-negative off the current state")
