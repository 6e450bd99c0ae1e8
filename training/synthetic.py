"""The embedded synthetic corpus: K domains of word-level Markov chains with exact log-probabilities.

Every domain shares one vocabulary of pronounceable words. The vocabulary is split into a block
of common words and one block of topical words per domain. In domain k the next word after w is
drawn from a mixture of two sparse parts:

* a shared part over common words, identical in every domain (it carries no domain evidence);
* a domain part over domain k's topical words (with a small leak into other domains' blocks).

The first word is a common word (shared distribution) or one of domain k's topical words. A
document therefore looks the same in every domain until topical words appear, and becomes
unambiguous after a few of them. After each word the document stops with a fixed probability,
except before ``min_length`` words where it never stops, so lengths are ``min_length`` plus a
geometric number of extra words. Because every probability is stored, the log-probability of a
text under the true process is exact, which gives the entropy floor no model can beat.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from dataclasses import asdict, dataclass, fields

import datasets
import torch

from dfm.errors import DfmError, reject_unknown_keys

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_FINALS = "nrst"
_SYLLABLE_COUNTS = (1, 2, 3)
_SYLLABLE_WEIGHTS = (0.15, 0.55, 0.30)
_FINAL_PROBABILITY = 0.3
_MAX_VOCAB = 10_000

_START_TOPIC = 0.2  # mass of the domain's topical words in the start distribution
_TOPIC_FROM_COMMON = 0.35  # mass of the domain part after a common word
_TOPIC_FROM_TOPICAL = 0.6  # mass of the domain part after a topical word
_LEAK = 0.05  # relative weight of other domains' topical words when choosing domain successors
_DIRICHLET_ALPHA = 1.0


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that determines the corpus. ``min/max_successors`` bound each of the two
    parts of a successor set (shared common-word part and domain part), so a word has
    ``2 * min_successors`` to ``2 * max_successors`` successors in each domain."""

    num_domains: int = 4
    num_documents: int = 4000
    seed: int = 0
    vocab_size: int = 200
    common_words: int = 40
    min_successors: int = 2
    max_successors: int = 4
    min_length: int = 5
    mean_length: float = 50.0
    priors: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.priors is not None:
            object.__setattr__(self, "priors", tuple(float(p) for p in self.priors))
        self.validate()

    def validate(self) -> None:
        if self.num_domains < 1:
            raise DfmError(f"synthetic num_domains must be >= 1, got {self.num_domains}")
        if self.num_documents < 1:
            raise DfmError(f"synthetic num_documents must be >= 1, got {self.num_documents}")
        if not 1 <= self.min_successors <= self.max_successors:
            raise DfmError(
                "synthetic successors need 1 <= min_successors <= max_successors, got "
                f"{self.min_successors} and {self.max_successors}"
            )
        if self.common_words < self.max_successors:
            raise DfmError(
                f"synthetic common_words ({self.common_words}) must be >= max_successors ({self.max_successors})"
            )
        if self.vocab_size > _MAX_VOCAB:
            raise DfmError(f"synthetic vocab_size must be <= {_MAX_VOCAB}, got {self.vocab_size}")
        if (self.vocab_size - self.common_words) // self.num_domains < self.max_successors:
            raise DfmError(
                "synthetic vocab_size too small: each domain needs at least max_successors "
                f"({self.max_successors}) topical words; raise vocab_size to at least "
                f"{self.common_words + self.num_domains * self.max_successors}"
            )
        if self.min_length < 1:
            raise DfmError(f"synthetic min_length must be >= 1, got {self.min_length}")
        if not math.isfinite(self.mean_length) or self.mean_length < self.min_length:
            raise DfmError(
                f"synthetic mean_length ({self.mean_length}) must be finite and >= min_length ({self.min_length})"
            )
        if self.priors is not None:
            if len(self.priors) != self.num_domains:
                raise DfmError(
                    f"synthetic priors has {len(self.priors)} entries; give one per domain ({self.num_domains})"
                )
            if not all(math.isfinite(p) and p > 0 for p in self.priors):
                raise DfmError(f"synthetic priors must be finite and > 0, got {self.priors}")

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.priors is not None:
            d["priors"] = list(self.priors)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SyntheticSpec:
        reject_unknown_keys(d, {f.name for f in fields(cls)}, "synthetic spec keys")
        return cls(**d)


def _dirichlet(rng: random.Random, n: int) -> list[float]:
    draws = [rng.gammavariate(_DIRICHLET_ALPHA, 1.0) for _ in range(n)]
    total = sum(draws)
    return [x / total for x in draws]


def _weighted_sample(rng: random.Random, weights: dict[int, float], k: int) -> list[int]:
    """k distinct keys, sampled without replacement proportionally to weight (Efraimidis-Spirakis)."""
    keys = {i: math.log(1.0 - rng.random()) / w for i, w in weights.items()}
    return sorted(sorted(keys, key=keys.__getitem__, reverse=True)[:k])


def _make_words(rng: random.Random, n: int) -> tuple[str, ...]:
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n:
        count = rng.choices(_SYLLABLE_COUNTS, _SYLLABLE_WEIGHTS)[0]
        word = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(count))
        if rng.random() < _FINAL_PROBABILITY:
            word += rng.choice(_FINALS)
        if word not in seen:
            seen.add(word)
            words.append(word)
    return tuple(words)


class SyntheticCorpus:
    """The true generating process of the embedded corpus, with exact log-probabilities."""

    def __init__(self, spec: SyntheticSpec) -> None:
        self.spec = spec
        K, V = spec.num_domains, spec.vocab_size
        rng = random.Random(f"dfm-synthetic-structure:{spec.seed}")
        self.words: tuple[str, ...] = _make_words(rng, V)
        self._index = {w: i for i, w in enumerate(self.words)}

        block = (V - spec.common_words) // K
        n_common = V - K * block  # the remainder of the division joins the common words
        common = list(range(n_common))
        topical = [list(range(n_common + k * block, n_common + (k + 1) * block)) for k in range(K)]
        self.stop_probability: float = 1.0 / (spec.mean_length - spec.min_length + 1.0)

        def successor_count() -> int:
            return rng.randint(spec.min_successors, spec.max_successors)

        start = torch.zeros(K, V, dtype=torch.float64)
        shared_start = _dirichlet(rng, n_common)
        for k in range(K):
            start[k, common] = (1.0 - _START_TOPIC) * torch.tensor(shared_start, dtype=torch.float64)
            start[k, topical[k]] = _START_TOPIC * torch.tensor(_dirichlet(rng, block), dtype=torch.float64)

        transition = torch.zeros(K, V, V, dtype=torch.float64)
        for w in range(V):
            shared = sorted(rng.sample(common, successor_count()))
            shared_p = torch.tensor(_dirichlet(rng, len(shared)), dtype=torch.float64)
            tau = _TOPIC_FROM_COMMON if w < n_common else _TOPIC_FROM_TOPICAL
            for k in range(K):
                others = [v for j in range(K) if j != k for v in topical[j]]
                pool = {v: (1.0 - _LEAK) / block for v in topical[k]}
                pool.update({v: _LEAK / len(others) for v in others})
                own = _weighted_sample(rng, pool, successor_count())
                transition[k, w, shared] = (1.0 - tau) * shared_p
                transition[k, w, own] = tau * torch.tensor(_dirichlet(rng, len(own)), dtype=torch.float64)

        raw_priors = spec.priors if spec.priors is not None else (1.0,) * K
        self.priors: torch.Tensor = torch.tensor(raw_priors, dtype=torch.float64)
        self.priors = self.priors / self.priors.sum()
        self.start_probs: torch.Tensor = start  # (K, V)
        self.transition_probs: torch.Tensor = transition  # (K, V, V), rows sum to 1
        self._log_priors = self.priors.log()
        self._log_start = start.log()
        self._log_transition = transition.log()
        s = self.stop_probability
        self._log_stop = math.log(s)
        self._log_continue = -math.inf if s >= 1.0 else math.log1p(-s)

        # Sparse cumulative tables for fast sampling, built from the same float64 probabilities.
        self._prior_table = self._table(self.priors)
        self._start_tables = [self._table(start[k]) for k in range(K)]
        self._transition_tables = [[self._table(transition[k, w]) for w in range(V)] for k in range(K)]

    @staticmethod
    def _table(probs: torch.Tensor) -> tuple[list[int], list[float]]:
        support = probs.nonzero().flatten().tolist()
        cumulative = list(itertools.accumulate(probs[support].tolist()))
        return support, cumulative

    @staticmethod
    def _draw(rng: random.Random, table: tuple[list[int], list[float]]) -> int:
        support, cumulative = table
        j = bisect.bisect_right(cumulative, rng.random() * cumulative[-1])
        return support[min(j, len(support) - 1)]

    def sample(self, n: int, seed: int) -> list[tuple[str, int]]:
        """n documents ``(text, domain)`` drawn from the mixture; the same seed gives the same list."""
        if n < 0:
            raise DfmError(f"number of synthetic documents to sample must be >= 0, got {n}")
        rng = random.Random(f"dfm-synthetic-sample:{seed}")
        min_length, s = self.spec.min_length, self.stop_probability
        out: list[tuple[str, int]] = []
        for _ in range(n):
            k = self._draw(rng, self._prior_table)
            word = self._draw(rng, self._start_tables[k])
            doc = [word]
            while not (len(doc) >= min_length and rng.random() < s):
                word = self._draw(rng, self._transition_tables[k][word])
                doc.append(word)
            out.append((" ".join(self.words[i] for i in doc), k))
        return out

    def _indices(self, text: str) -> list[int]:
        if text == "":
            return []
        try:
            return [self._index[w] for w in text.split(" ")]
        except KeyError as e:
            raise DfmError(
                f"word {e.args[0]!r} is not in the synthetic vocabulary; a synthetic text is "
                "vocabulary words joined by single spaces"
            ) from None

    def domain_log_likelihoods(self, text: str, complete: bool = True) -> torch.Tensor:
        """(K,) natural-log probability of ``text`` under each domain.

        complete=True: ``text`` is a whole document (includes the STOP event after its last word).
        complete=False: probability that a document starts with these words (a prefix; "" -> 0).
        """
        idx = self._indices(text)
        K = self.spec.num_domains
        n = len(idx)
        if n == 0:
            return torch.full((K,), -math.inf if complete else 0.0, dtype=torch.float64)
        t = torch.tensor(idx)
        ll = self._log_start[:, t[0]] + self._log_transition[:, t[:-1], t[1:]].sum(dim=-1)
        continues = max(0, n - self.spec.min_length)  # positions min_length..n-1 did not stop
        length_term = continues * self._log_continue if continues > 0 else 0.0
        if complete:
            length_term += self._log_stop if n >= self.spec.min_length else -math.inf
        return ll + length_term

    def log_prob(self, text: str, complete: bool = True) -> float:
        """log sum_k pi_k q_k(text) in nats (see ``domain_log_likelihoods`` for ``complete``)."""
        joint = self._log_priors + self.domain_log_likelihoods(text, complete)
        return torch.logsumexp(joint, dim=0).item()

    def posterior(self, text: str) -> torch.Tensor:
        """(K,) P(k | text) for ``text`` read as a prefix ("" gives the priors).

        The stop process is the same in every domain, so this is also the posterior of ``text``
        as a complete document whenever that document is possible.
        """
        joint = self._log_priors + self.domain_log_likelihoods(text, complete=False)
        if torch.isinf(joint).all():
            raise DfmError(f"text {text[:40]!r} is impossible in every synthetic domain")
        return torch.softmax(joint, dim=0)

    def entropy_floor_bpb(self, texts: list[str]) -> float:
        """sum(-log2 p(text)) / sum(utf-8 bytes of text): the true bits per byte of these
        documents (STOP included), an estimate of the entropy rate when ``texts`` are samples."""
        total_bytes = sum(len(t.encode("utf-8")) for t in texts)
        if total_bytes == 0:
            raise DfmError("entropy floor needs at least one non-empty text")
        nats = math.fsum(-self.log_prob(t) for t in texts)
        return nats / math.log(2.0) / total_bytes

    def to_dataset(self) -> datasets.Dataset:
        """``spec.num_documents`` documents sampled with ``spec.seed``; columns text and domain."""
        docs = self.sample(self.spec.num_documents, self.spec.seed)
        return datasets.Dataset.from_dict({"text": [t for t, _ in docs], "domain": [k for _, k in docs]})
