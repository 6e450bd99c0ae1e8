"""The routing weighers: where the weights w_k of every routing mode come from, for decoding and
for scoring alike (one implementation per mode).

A weigher answers two questions about the prefixes it routes on:

- ``__call__(tokens, attention_mask) -> (B, K)``: log-weights of the newest prefix of every row
  of a growing batch (``dfm.pool.Weigher``, what ``dfm.decode`` calls once per token);
- ``documents(docs, expert_log_probs, scoring) -> [(n + 1, K)]``: log-weights of every prefix of
  every document (prediction j routed on BOS plus j document tokens), what ``dfm eval`` mixes
  the experts' per-token log-probabilities with.

Modes then sparsify the weights with ``dfm.routing.select_experts`` (``mode_log_weights``), the
same function decoding calls. Bayes weights need the experts' own likelihood of the prefix: in
decoding ``dfm.decode`` accumulates it from the pool; in scoring ``BayesWeigher`` reads it from
the per-token log-probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dfm.errors import DfmError
from dfm.posterior import prefix_log_posteriors
from dfm.progress import progress
from dfm.routing import Routing, parse_mode, select_experts
from models.partition import Partition
from models.router import Router
from models.scoring import Docs, router_log_weights

#: Features and centres are unit vectors, so d^2 = 2 - 2 cos lies in [0, 4] and
#: softmax(-d^2 / T) weighs two clusters whose cosines to the prefix differ by D in the ratio
#: exp(2 D / T). Prefix-to-centre cosines of tf-idf vectors differ by roughly 0.05 to 0.3, which
#: T = 0.1 turns into ratios of e^1 to e^6: decisive when the prefix is informative, near uniform
#: when it is not. T = 1 would cap even the extreme case (D = 2) at e^4 and stay close to uniform.
DEFAULT_TEMPERATURE = 0.1


@dataclass(frozen=True)
class Scoring:
    """How documents are read for scoring: ``[BOS] + ids``, windows of ``context`` tokens every ``stride``."""

    bos_id: int
    context: int
    stride: int | None = None
    batch_size: int = 8


class RouterWeigher:
    """The learned router: log P(k | prefix). Incremental in decoding (its own KV cache)."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.cache = None
        self.seen = 0

    @torch.inference_mode()
    def __call__(self, tokens: Tensor, attention_mask: Tensor) -> Tensor:
        if self.cache is None or tokens.shape[1] < self.seen:
            self.cache, self.seen = self.router.new_cache(), 0
        logits = self.router(tokens[:, self.seen :], attention_mask, cache=self.cache)
        self.seen = tokens.shape[1]
        return torch.log_softmax(logits[:, -1].double(), dim=-1)

    def documents(self, docs: Docs, expert_log_probs: Sequence[Tensor], scoring: Scoring) -> list[Tensor]:
        return router_log_weights(
            self.router,
            docs,
            bos_id=scoring.bos_id,
            context=scoring.context,
            stride=scoring.stride,
            batch_size=scoring.batch_size,
            desc="eval: router",
        )


class PriorWeigher:
    """Weights that ignore the prefix: the cluster priors (a one-expert ensemble needs no router)."""

    def __init__(self, log_prior: Tensor) -> None:
        self.log_prior = log_prior

    def __call__(self, tokens: Tensor, attention_mask: Tensor) -> Tensor:
        return self.log_prior.to(tokens.device).expand(tokens.shape[0], -1)

    def documents(self, docs: Docs, expert_log_probs: Sequence[Tensor], scoring: Scoring) -> list[Tensor]:
        return [self.log_prior.expand(len(d) + 1, -1).clone() for d in docs]


class BayesWeigher:
    """The exact posterior pi_k q_k(prefix) / sum_j pi_j q_j(prefix) from the experts' own
    likelihoods (scoring; decoding accumulates the same posterior inside ``dfm.decode``)."""

    def __init__(self, log_prior: Tensor) -> None:
        self.log_prior = log_prior

    def documents(self, docs: Docs, expert_log_probs: Sequence[Tensor], scoring: Scoring) -> list[Tensor]:
        return [prefix_log_posteriors(lp, self.log_prior) for lp in expert_log_probs]


class OracleWeigher:
    """The true cluster's expert alone (evaluation): log-weight 0 on it, -inf elsewhere; one cluster
    per row or document."""

    def __init__(self, clusters: Sequence[int], num_experts: int) -> None:
        self.clusters = [int(c) for c in clusters]
        bad = [c for c in self.clusters if not 0 <= c < num_experts]
        if bad:
            raise DfmError(f"oracle clusters {bad} are not experts of this ensemble (0..{num_experts - 1})")
        self.num_experts = num_experts
        self._decoding: Tensor | None = None  # the same weights at every token: built once

    def _one_hot(self, rows: int) -> Tensor:
        if rows != len(self.clusters):
            raise DfmError(
                f"oracle routing got {len(self.clusters)} clusters for {rows} prompts or documents: give one per prompt"
            )
        one_hot = torch.full((rows, self.num_experts), -math.inf, dtype=torch.float64)
        one_hot[torch.arange(rows), self.clusters] = 0.0
        return one_hot

    def __call__(self, tokens: Tensor, attention_mask: Tensor) -> Tensor:
        if self._decoding is None or self._decoding.shape[0] != tokens.shape[0]:
            self._decoding = self._one_hot(tokens.shape[0]).to(tokens.device)
        return self._decoding

    def documents(self, docs: Docs, expert_log_probs: Sequence[Tensor], scoring: Scoring) -> list[Tensor]:
        one_hot = self._one_hot(len(docs))
        return [one_hot[i].expand(len(d) + 1, -1).clone() for i, d in enumerate(docs)]


class CentroidWeigher:
    """c-BTM routing: log softmax(-d_k^2 / T) of the prefix's tf-idf vector to every cluster centre.

    The prefix is the real tokens of the row (padding and a leading BOS dropped). tf-idf is
    recomputed over the whole prefix at every call: O(prefix length) per token in decoding,
    negligible next to the experts' forward passes, and O(n^2) per scored document. An empty
    prefix is equally far from every centre: uniform. ``clusters`` lists the clusters the
    ensemble's experts serve (all, unless some are missing).
    """

    def __init__(
        self,
        partition: Partition,
        temperature: float = DEFAULT_TEMPERATURE,
        bos_id: int | None = None,
        clusters: list[int] | None = None,
    ) -> None:
        if not temperature > 0:
            raise DfmError(f"centroid routing temperature must be > 0, got {temperature}")
        self.partition = partition
        self.temperature = temperature
        self.bos_id = bos_id
        self.clusters = clusters

    def _weigh(self, prefixes: Sequence[Sequence[int] | Tensor]) -> Tensor:
        log_weights = self.partition.log_weights(prefixes, self.temperature).double()
        return log_weights if self.clusters is None else torch.log_softmax(log_weights[:, self.clusters], dim=-1)

    def __call__(self, tokens: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, K) float64 log-weights."""
        prefixes = []
        for row, mask in zip(tokens.cpu(), attention_mask.cpu().bool()):
            ids = row[mask]
            if self.bos_id is not None and len(ids) and int(ids[0]) == self.bos_id:
                ids = ids[1:]
            prefixes.append(ids)
        return self._weigh(prefixes).to(tokens.device)

    def documents(self, docs: Docs, expert_log_probs: Sequence[Tensor], scoring: Scoring) -> list[Tensor]:
        return [
            self._weigh([ids[:t] for t in range(len(ids) + 1)])
            for ids in progress(docs, desc="eval: centroid distances", unit="doc")
        ]


#: Any weigher of this module (BayesWeigher scores documents only: decoding's posterior is the core's).
AnyWeigher = RouterWeigher | PriorWeigher | BayesWeigher | OracleWeigher | CentroidWeigher


def mode_log_weights(mode: str, log_weights: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The weights ``mode`` mixes with, from its weigher's ``log_weights`` (..., K): top-N keeps
    the N largest, switch one drawn expert, every other mode renormalises (``select_experts``)."""
    routing, k = parse_mode(mode)
    if routing is Routing.TOPK:
        k = min(k or 1, log_weights.shape[-1])
    flat = log_weights.reshape(-1, log_weights.shape[-1])
    return select_experts(flat, routing, k=k, generator=generator).log_weights.reshape(log_weights.shape)
