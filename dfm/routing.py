"""Routing modes (README, "Design: routing modes") and the choice of experts that run for one token."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from dfm.errors import DfmError
from dfm.mixing import normalize_log_weights, top_k_log_weights


class Routing(str, Enum):
    MIXTURE = "mixture"  # learned router weights, every expert runs
    TOPK = "topk"  # router weights, k largest kept and renormalised
    SWITCH = "switch"  # one expert sampled from the router weights, then a token from it
    BAYES = "bayes"  # exact posterior from the experts' own likelihood of the prefix
    CENTROID = "centroid"  # tf-idf distance to cluster centres (c-BTM), optionally top-k
    ORACLE = "oracle"  # one-hot true cluster (evaluation only)

    @property
    def uses_router(self) -> bool:
        """Whether the mode's weights come from the learned router (bayes, centroid and oracle need none)."""
        return self in (Routing.MIXTURE, Routing.TOPK, Routing.SWITCH)


def parse_routing(name: str | Routing) -> Routing:
    try:
        return Routing(name)
    except ValueError:
        choices = ", ".join(r.value for r in Routing)
        raise DfmError(f"unknown routing mode {name!r}; choose one of: {choices}") from None


def parse_mode(name: str) -> tuple[Routing, int | None]:
    """A mode name of `dfm eval` and `dfm generate` -> (routing, k): ``topN`` is top-k routing with
    k = N (``top1``, ``top2``, ...); every other name is a Routing value with no k."""
    if name.startswith("top") and name[3:].isdigit():
        return Routing.TOPK, int(name[3:])
    return parse_routing(name), None


@dataclass
class Selection:
    """The weights actually used for one token and the experts that must run."""

    log_weights: Tensor  # (B, K), -inf for experts that do not contribute
    active: list[int]  # experts with a non-zero weight in any row, ascending


def select_experts(
    log_weights: Tensor,
    routing: Routing,
    k: int | None = None,
    generator: torch.Generator | None = None,
) -> Selection:
    """Sparsify routing weights (B, K) as the mode prescribes and list the experts to run."""
    if routing is Routing.TOPK or (routing is Routing.CENTROID and k is not None):
        used = top_k_log_weights(log_weights, k if k is not None else 1)
    elif routing is Routing.SWITCH:
        probs = normalize_log_weights(log_weights).exp().float()
        device = generator.device if generator is not None else probs.device
        chosen = torch.multinomial(probs.to(device), 1, generator=generator).to(log_weights.device)
        used = torch.full_like(log_weights, float("-inf")).scatter(-1, chosen, 0.0)
    else:
        used = normalize_log_weights(log_weights)
    active = torch.isfinite(used).any(0).nonzero().flatten().tolist()
    return Selection(used, active)
