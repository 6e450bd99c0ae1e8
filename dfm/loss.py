"""The discrete flow matching losses: the autoregressive path and the masked (any-order) path."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfm.masked_path import MaskedPath

#: A training loss: (model, batch of rows) -> scalar.
LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]

#: Target id that carries no loss (the convention of torch's cross_entropy and transformers' labels).
IGNORE_INDEX = -100


def dfm_loss(logits: Tensor, tokens: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Mean negative log-likelihood of the observed transitions X_t -> X_{t+1} of the AR path.

    ``logits[:, t]`` parameterise the velocity of step t (revealing ``tokens[:, t + 1]``). The
    transition kernel delta_{X_t} + u_t puts p(y | x_<=t) on every revealed symbol y (the -1 of
    the velocity on M cancels the delta on the current state M), so the loss of every step of the
    path at once (teacher forcing: X_t = ``ARPath.sample(tokens, t)`` for all t) is next-token
    cross-entropy. ``attention_mask`` (B, N) drops the targets where it is 0 (padding); the mean
    runs over the kept targets, and is 0 when none is kept.
    """
    targets = tokens[:, 1:]
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
    if not (targets != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    source = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(source.reshape(-1, source.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def masked_elbo(
    logits: Tensor, x1: Tensor, xt: Tensor, t: Tensor, path: MaskedPath, attention_mask: Tensor | None = None
) -> Tensor:
    """Per sequence (B,), the ELBO integrand of the masked path at time t:
    w(t) * sum over masked positions of -log p(x1_i | X_t), with w = d_kappa / (1 - kappa).

    Its expectation over t ~ U(0, 1) and X_t ~ path.sample(x1, t) bounds -log p(x1) from above,
    with equality when the logits are the exact conditionals of the data.
    """
    log_probs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    nll = -log_probs.gather(-1, x1.unsqueeze(-1)).squeeze(-1)
    scored = xt == path.mask_id
    if attention_mask is not None:
        scored = scored & (attention_mask != 0)
    per_sequence = torch.where(scored, nll, torch.zeros_like(nll)).sum(-1)
    return path.loss_weight(t.to(per_sequence.dtype)) * per_sequence


def masked_dfm_loss(
    logits: Tensor, x1: Tensor, xt: Tensor, t: Tensor, path: MaskedPath, attention_mask: Tensor | None = None
) -> Tensor:
    """The masked path's DFM loss: the batch's ELBO per real token (an upper bound on NLL per token)."""
    tokens = x1.numel() if attention_mask is None else attention_mask.sum()
    return masked_elbo(logits, x1, xt, t, path, attention_mask).sum() / tokens
