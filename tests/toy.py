"""An exact toy source for the core tests: K first-order Markov chains over a few symbols.

``MarkovPool`` implements the core's ExpertPool with the chains' exact conditionals, so the
mixing and posterior maths can be checked against brute-force enumeration.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor


class MarkovPool:
    def __init__(self, num_experts: int = 3, vocab_size: int = 4, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.vocab_size = vocab_size
        # row 0 of `start` is the BOS distribution; transitions[k, a, b] = q_k(b | a)
        self.start = torch.rand(num_experts, vocab_size, generator=g, dtype=torch.float64).softmax(-1)
        self.transitions = (
            3 * torch.rand(num_experts, vocab_size, vocab_size, generator=g, dtype=torch.float64)
        ).softmax(-1)
        self.calls: list[list[int]] = []

    @property
    def num_experts(self) -> int:
        return self.start.shape[0]

    def conditional(self, prefix: Sequence[int]) -> Tensor:
        """(K, V) probabilities of the next symbol after a prefix (without BOS)."""
        return self.start if not prefix else self.transitions[:, prefix[-1]]

    def next_token_log_probs(
        self, tokens: Tensor, attention_mask: Tensor, experts: Sequence[int], rows: Tensor | None = None
    ) -> Tensor:
        self.calls.append(list(experts))
        rows = [self.conditional(self._real(t, m))[list(experts)] for t, m in zip(tokens, attention_mask)]
        return torch.stack(rows).log()

    def prefix_log_likelihood(self, tokens: Tensor, attention_mask: Tensor, experts: Sequence[int]) -> Tensor:
        rows = []
        for t, m in zip(tokens, attention_mask):
            seq = self._real(t, m)
            rows.append(self.sequence_log_prob(seq)[list(experts)])
        return torch.stack(rows)

    def sequence_log_prob(self, seq: Sequence[int]) -> Tensor:
        """(K,) log q_k(seq)."""
        total = torch.zeros(self.num_experts, dtype=torch.float64)
        for i, y in enumerate(seq):
            total += self.conditional(seq[:i])[:, y].log()
        return total

    @staticmethod
    def _real(tokens: Tensor, mask: Tensor) -> list[int]:
        # position 0 of every row is BOS (id ignored); left padding is masked out
        return tokens[mask.bool()].tolist()[1:]

    def marginal_next(self, prefix: Sequence[int], prior: Tensor, length: int) -> Tensor:
        """p(y | prefix) of the mixture source by brute-force enumeration of all sequences of ``length``."""
        joint = torch.zeros(self.vocab_size, dtype=torch.float64)
        tail = length - len(prefix) - 1
        for y in range(self.vocab_size):
            for rest in itertools.product(range(self.vocab_size), repeat=tail):
                seq = [*prefix, y, *rest]
                joint[y] += (prior.log() + self.sequence_log_prob(seq)).exp().sum()
        return joint / joint.sum()
