"""K masked experts and a noisy-state router as one denoiser for the masked path's sampler.

The router gives P(k | X_t) for a whole masked state; the ensemble's posterior of the clean
token at every masked position is the router-weighted mixture of the experts' posteriors, mixed
in log space (``dfm.mixing.mix_log_probs``). Routing modes: ``mixture`` (every expert),
``topk`` (the k largest weights), ``switch`` (one expert drawn from the router at every step:
stochastic expert switching) and ``oracle`` (a given expert per sequence).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from dfm.errors import DfmError
from dfm.masked_path import MaskedPath
from dfm.masked_sampler import Denoiser
from dfm.mixing import exclude_log_weights, mix_log_probs, uniform_log_prior
from dfm.routing import Routing, select_experts
from dfm.schedulers import scheduler
from models.ensemble import load_members
from models.masked_expert import clean_logits, load_masked_expert
from models.router import state_logits
from models.weighers import OracleWeigher

#: the routing modes the masked sampler supports
MASKED_ROUTINGS = (Routing.MIXTURE, Routing.TOPK, Routing.SWITCH, Routing.ORACLE)


def masked_routing(name: str | Routing) -> Routing:
    """The routing mode called ``name``, refused unless the masked sampler supports it."""
    mode = name if isinstance(name, Routing) else next((r for r in Routing if r.value == name), None)
    if mode not in MASKED_ROUTINGS:
        choices = ", ".join(r.value for r in MASKED_ROUTINGS)
        raise DfmError(
            f"routing {str(getattr(name, 'value', name))!r} is not available on the masked path; "
            f"choose one of: {choices} (or topN)"
        )
    return mode


class MaskedEnsemble:
    """Masked experts (sharing one tokenizer and mask id) and a router over noisy states (None for one expert)."""

    def __init__(
        self,
        experts: Sequence[nn.Module],
        router: nn.Module | None,
        *,
        log_prior: Tensor | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        names: Sequence[str] | None = None,
        clusters: Sequence[int] | None = None,
        path: MaskedPath | None = None,
    ) -> None:
        if not experts:
            raise DfmError("a masked ensemble needs at least one expert")
        self.experts = list(experts)
        self.router = router
        count = len(self.experts)
        self.log_prior = log_prior if log_prior is not None else uniform_log_prior(count)
        self.tokenizer = tokenizer
        self.names = list(names) if names is not None else [f"expert-{i}" for i in range(count)]
        self.clusters = list(clusters) if clusters is not None else list(range(count))
        vocab_size = self.experts[0].config.mask_token_id
        self.path = path if path is not None else MaskedPath(vocab_size, scheduler("linear"))

    @classmethod
    def from_run(
        cls,
        run_dir: str | os.PathLike,
        device: torch.device | str | None = None,
        allow_missing: bool = False,
        load_router: bool = True,
        dtype: torch.dtype | None = None,
    ) -> MaskedEnsemble:
        """Load the masked experts (in ``dtype`` if given), noisy-state router, priors, tokenizer and
        path of a masked run."""
        members = load_members(
            run_dir,
            load_masked_expert,
            device=device,
            allow_missing=allow_missing,
            load_router=load_router,
            kind="masked",
            extra_symbols=1,
            dtype=dtype,
        )
        path = MaskedPath(len(members.tokenizer), scheduler(members.manifest.extra["path"]["scheduler"]))
        return cls(
            members.experts,
            members.router,
            log_prior=members.log_prior,
            tokenizer=members.tokenizer,
            names=members.names,
            clusters=members.clusters,
            path=path,
        )

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def context(self) -> int:
        """The longest state every model reads (experts, and the router)."""
        sizes = [e.config.max_position_embeddings for e in self.experts]
        if self.router is not None:
            sizes.append(self.router.config.max_positions)
        return min(sizes)

    @torch.no_grad()
    def log_weights(self, xt: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """log P(k | X_t), (B, K), from the router's output at the last real position of the state."""
        if self.router is None:
            if self.num_experts == 1:
                return torch.zeros(xt.shape[0], 1, dtype=torch.float64, device=xt.device)
            raise DfmError("this routing needs the noisy-state router: run `dfm train-router` and `dfm assemble`")
        return torch.log_softmax(state_logits(self.router, xt, attention_mask).double(), dim=-1)

    def denoiser(
        self,
        routing: Routing,
        *,
        k: int | None = None,
        oracle: Tensor | None = None,
        exclude: Sequence[int] = (),
        generator: torch.Generator | None = None,
    ) -> Denoiser:
        """The ensemble's log p(x1_i | X_t), (B, N, V), under ``routing``; ``oracle`` (B,) names
        each sequence's expert for ``oracle`` routing; ``exclude`` opts experts out (weights renormalised)."""
        masked_routing(routing)
        if routing is Routing.ORACLE and oracle is None:
            raise DfmError("oracle routing needs each sequence's cluster")

        @torch.no_grad()
        def denoise(xt: Tensor, t: Tensor) -> Tensor:
            if routing is Routing.ORACLE:
                weights = OracleWeigher(oracle.tolist(), self.num_experts)(xt, None)
            else:
                weights = self.log_weights(xt)
            weights = exclude_log_weights(weights, exclude) if exclude else weights
            selection = select_experts(weights, routing, k=k, generator=generator)
            log_probs = torch.stack(
                [clean_logits(self.experts[e], xt).double().log_softmax(-1) for e in selection.active], dim=1
            )
            return mix_log_probs(log_probs, selection.log_weights[:, selection.active].to(log_probs.device))

        return denoise
