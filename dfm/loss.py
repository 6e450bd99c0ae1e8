"""The discrete flow matching loss on the autoregressive path."""

from __future__ import annotations

import torch
from torch import Tensor


def dfm_loss(logits: Tensor, tokens: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Mean negative log-likelihood of the observed transitions X_t -> X_{t+1}.

    ``logits[:, t]`` parameterise the velocity of step t (revealing ``tokens[:, t + 1]``). The
    transition kernel delta_{X_t} + u_t puts p(y | x_<=t) on every revealed symbol y (the -1 of
    the velocity on M cancels the delta on the current state M), so the loss of the AR path is
    next-token cross-entropy; ``attention_mask`` (B, N) drops padded targets.
    """
    log_kernel = torch.log_softmax(logits[:, :-1], dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    targets = tokens[:, 1:]
    nll = -log_kernel.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if attention_mask is None:
        return nll.mean()
    keep = attention_mask[:, 1:].to(nll.dtype)
    return (nll * keep).sum() / keep.sum().clamp_min(1.0)
