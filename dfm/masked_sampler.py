"""The N-step sampler of the masked path: discrete Euler steps from all-masked (or a clean
prompt prefix) at t = 0 to a clean sequence at t = 1.

Each step t -> s reveals every still-masked token independently with probability
(kappa(s) - kappa(t)) / (1 - kappa(t)) (the path's exact survival over the step, whose rate is the
velocity's d_kappa / (1 - kappa)), drawing its value from the denoiser's posterior at X_t; the
last step reveals whatever is left. Revealed tokens never change, so a prompt stays as given.
Which tokens a step reveals is drawn first: a step that reveals none skips the denoiser, so
N far beyond the sequence length costs about as much as N equal to it.
Tokens revealed in the same step are drawn independently given X_t: that is the discretisation
error, which vanishes as the number of steps grows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dfm.errors import DfmError
from dfm.masked_path import MaskedPath
from dfm.sampling import sample_tokens

#: denoise(X_t (B, N), t (B,)) -> log p(x1_i = v | X_t), shape (B, N, V)
Denoiser = Callable[[Tensor, Tensor], Tensor]
#: on_step(step, X_s) after each step, e.g. to stream the revealed text
StepCallback = Callable[[int, Tensor], None]


def euler_sample(
    denoise: Denoiser,
    x: Tensor,
    path: MaskedPath,
    steps: int,
    *,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    on_step: StepCallback | None = None,
) -> Tensor:
    """Sample clean sequences from the state ``x`` (B, N) (masks where unknown) in ``steps`` Euler steps."""
    if steps < 1:
        raise DfmError(f"the sampler needs at least 1 step, got {steps}")
    times = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    device = generator.device if generator is not None else x.device
    for step in range(steps):
        masked = x == path.mask_id
        if not masked.any():
            break
        last = step == steps - 1
        reveal_prob = 1.0 if last else float(path.reveal_probability(times[step], times[step + 1]))
        draw = torch.rand(x.shape, generator=generator, dtype=torch.float64, device=device).to(x.device)
        reveal = masked & (draw < reveal_prob)
        if reveal.any():  # a step that reveals nothing needs no denoiser call: the state stays
            log_probs = denoise(x, times[step].expand(x.shape[0]))
            tokens = sample_tokens(log_probs.reshape(-1, log_probs.shape[-1]), generator, temperature).reshape(x.shape)
            x = torch.where(reveal, tokens, x)
        if on_step is not None:
            on_step(step, x)
    return x
