"""The interfaces the core decodes through, so it never needs to know about Hugging Face."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from torch import Tensor


class ExpertPool(Protocol):
    """K experts over one vocabulary, each able to score the next token of a batch of sequences.

    ``tokens`` (B, T) are left-padded sequences, ``attention_mask`` (B, T) marks real tokens.
    Calls come with growing ``tokens`` (one column more per decoding step), so an
    implementation may keep per-expert caches and feed each expert only what it has not seen.
    """

    @property
    def num_experts(self) -> int: ...

    def next_token_log_probs(
        self, tokens: Tensor, attention_mask: Tensor, experts: Sequence[int], rows: Tensor | None = None
    ) -> Tensor:
        """log p_e(x_{T+1} | x_<=T) for each listed expert: (B, len(experts), V).

        ``rows`` (B, len(experts)) bool, when given, marks the (row, expert) pairs the caller
        mixes with a non-zero weight; a pool may skip the others and return any finite values there.
        The result may be a view of the pool's own buffer: read it before the next call.
        """
        ...

    def prefix_log_likelihood(self, tokens: Tensor, attention_mask: Tensor, experts: Sequence[int]) -> Tensor:
        """sum over real tokens t >= 1 of log p_e(x_t | x_<t), for each listed expert: (B, len(experts))."""
        ...


class Weigher(Protocol):
    """Routing weights from the prefix: normalised log w_k(x_<=T) of shape (B, K) (router, centroid, oracle)."""

    def __call__(self, tokens: Tensor, attention_mask: Tensor) -> Tensor: ...
