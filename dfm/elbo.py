"""Nats of a document under a masked model: the path's ELBO in its masked-count form, an upper
bound on its NLL (the time-integral form, ``dfm.loss.masked_elbo``, is what experts train on).

For a denoiser that does not read t (every dfm masked expert), integrating the ELBO weight
d_kappa / (1 - kappa) against the masking probabilities over t gives, for a set S of m masked
positions out of n, exactly 1 / (m * C(n, m)) whatever the scheduler, so

    ELBO = sum_{m=1..n} (1 / m) E_{S uniform, |S| = m} [ sum_{i in S} -log p(x_i | x with S masked) ].

``elbo_nats`` estimates this form: m stratified over 1..n, S uniform given m, each draw weighted
n / m. It has the expectation of the time integral and a bounded variance (a draw of the time
integral is unbounded near t = 1, where w(t) diverges).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dfm.errors import DfmError
from dfm.masked_path import MaskedPath
from dfm.masked_sampler import Denoiser


def elbo_masks(n: int, samples: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Draws of the masked-count ELBO for a sequence of ``n`` tokens: masks (samples, n), m of n
    positions uniformly chosen per row with m stratified over 1..n, and each row's weight n / m
    (float64). The ELBO is the mean over rows of weight * sum of the masked positions' NLL."""
    if samples < 1:
        raise DfmError(f"the ELBO needs at least 1 sample, got {samples}")
    strata = torch.arange(samples, dtype=torch.float64) + torch.rand(samples, generator=generator, dtype=torch.float64)
    masked_count = (strata / samples * n).floor().long().clamp(max=n - 1) + 1  # (samples,), in 1..n
    ranks = torch.rand(samples, n, generator=generator).argsort(-1).argsort(-1)
    return ranks < masked_count.unsqueeze(-1), n / masked_count.double()


def draw_nats(token_log_probs: Tensor, masked: Tensor, weight: Tensor) -> Tensor:
    """Per draw (row), the ELBO estimate in nats: weight * minus the log-probabilities of the
    true tokens at the masked positions (draws from ``elbo_masks``)."""
    return -(token_log_probs.double() * masked).sum(-1) * weight


@torch.no_grad()
def elbo_nats(
    denoise: Denoiser, sequence: Tensor, path: MaskedPath, samples: int = 8, generator: torch.Generator | None = None
) -> float:
    """Monte-Carlo ELBO in nats of one clean ``sequence`` (n,): an upper bound on -log p(sequence).

    All draws go in one batch of ``samples`` rows, so no padding is ever read. The denoiser gets
    t = 1 - m / n, the time at which a linear schedule masks m of n tokens on average.
    """
    n = sequence.shape[0]
    masked, weight = elbo_masks(n, samples, generator)
    x1 = sequence.unsqueeze(0).expand(samples, -1)
    xt = torch.where(masked.to(x1.device), torch.full_like(x1, path.mask_id), x1)
    t = 1 - masked.sum(-1).double() / n
    log_probs = denoise(xt, t).gather(-1, x1.unsqueeze(-1)).squeeze(-1).cpu()
    return float(draw_nats(log_probs, masked, weight).mean())
