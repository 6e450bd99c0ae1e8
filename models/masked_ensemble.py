"""K masked experts and a noisy-state router as one denoiser for the masked path's sampler.

The router gives P(k | X_t) for a whole masked state; the ensemble's posterior of the clean
token at every masked position is the router-weighted mixture of the experts' posteriors, mixed
in log space (``dfm.mixing.mix_log_probs``). Routing modes: ``mixture`` (every expert),
``topk`` (the k largest weights), ``switch`` (one expert drawn from the router at every step:
stochastic expert switching) and ``oracle`` (a given expert per sequence).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dfm.errors import DfmError
from dfm.masked_sampler import Denoiser
from dfm.mixing import mix_log_probs
from dfm.routing import Routing, select_experts
from models.masked_expert import clean_logits

#: the routing modes the masked sampler supports
MASKED_ROUTINGS = (Routing.MIXTURE, Routing.TOPK, Routing.SWITCH, Routing.ORACLE)


class MaskedEnsemble:
    """Masked experts (sharing one tokenizer and mask id) and a router over noisy states (None for one expert)."""

    def __init__(self, experts: Sequence[nn.Module], router: nn.Module | None) -> None:
        if not experts:
            raise DfmError("a masked ensemble needs at least one expert")
        self.experts = list(experts)
        self.router = router

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @torch.no_grad()
    def log_weights(self, xt: Tensor) -> Tensor:
        """log P(k | X_t), (B, K), from the router's output at the last position of the state."""
        if self.router is None:
            if self.num_experts == 1:
                return torch.zeros(xt.shape[0], 1, dtype=torch.float64)
            raise DfmError("this routing needs the noisy-state router: train it first")
        return torch.log_softmax(self.router(xt)[:, -1].double(), dim=-1)

    def denoiser(self, routing: Routing, *, k: int | None = None, oracle: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Denoiser:
        """The ensemble's log p(x1_i | X_t), (B, N, V), under ``routing``; ``oracle`` (B,) names
        each sequence's expert for ``oracle`` routing."""
        if routing not in MASKED_ROUTINGS:
            choices = ", ".join(r.value for r in MASKED_ROUTINGS)
            raise DfmError(f"routing {routing.value!r} is not available on the masked path; choose one of: {choices}")
        if routing is Routing.ORACLE and oracle is None:
            raise DfmError("oracle routing needs each sequence's cluster")

        @torch.no_grad()
        def denoise(xt: Tensor, t: Tensor) -> Tensor:
            if routing is Routing.ORACLE:
                weights = torch.full((xt.shape[0], self.num_experts), float("-inf"), dtype=torch.float64)
                weights[torch.arange(xt.shape[0]), oracle] = 0.0
            else:
                weights = self.log_weights(xt)
            selection = select_experts(weights, routing, k=k, generator=generator)
            log_probs = torch.stack([clean_logits(self.experts[e], xt).double().log_softmax(-1)
                                     for e in selection.active], dim=1)
            return mix_log_probs(log_probs, selection.log_weights[:, selection.active].to(log_probs.device))

        return denoise
