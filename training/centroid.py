"""Centroid routing (c-BTM): weight experts by the tf-idf distance of the prefix to their cluster."""

from __future__ import annotations

import torch
from torch import Tensor

from dfm.errors import DfmError
from training.partition import Partition

#: Features and centres are unit vectors, so d^2 = 2 - 2 cos lies in [0, 4] and
#: softmax(-d^2 / T) weighs two clusters whose cosines to the prefix differ by D in the ratio
#: exp(2 D / T). Prefix-to-centre cosines of tf-idf vectors differ by roughly 0.05 to 0.3, which
#: T = 0.1 turns into ratios of e^1 to e^6: decisive when the prefix is informative, near uniform
#: when it is not. T = 1 would cap even the extreme case (D = 2) at e^4 and stay close to uniform.
DEFAULT_TEMPERATURE = 0.1


class CentroidWeigher:
    """A ``dfm.pool.Weigher`` for the ``centroid`` mode: log softmax(-d_k^2 / T) of every row's prefix.

    The prefix is the real tokens of the row (padding and a leading BOS dropped). tf-idf is
    recomputed over the whole prefix at every call: O(prefix length) per token, negligible next
    to the experts' forward passes. An empty prefix is equally far from every centre: uniform.
    """

    def __init__(self, partition: Partition, temperature: float = DEFAULT_TEMPERATURE,
                 bos_id: int | None = None, clusters: list[int] | None = None) -> None:
        if not temperature > 0:
            raise DfmError(f"centroid routing temperature must be > 0, got {temperature}")
        self.partition = partition
        self.temperature = temperature
        self.bos_id = bos_id
        self.clusters = clusters  # the clusters the pool's experts serve (all, unless some are missing)

    def __call__(self, tokens: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, K) float64 log-weights."""
        prefixes = []
        for row, mask in zip(tokens.cpu(), attention_mask.cpu().bool()):
            ids = row[mask]
            if self.bos_id is not None and len(ids) and int(ids[0]) == self.bos_id:
                ids = ids[1:]
            prefixes.append(ids)
        log_weights = self.partition.log_weights(prefixes, self.temperature)
        if self.clusters is not None:
            log_weights = torch.log_softmax(log_weights[:, self.clusters], dim=-1)
        return log_weights.double().to(tokens.device)
