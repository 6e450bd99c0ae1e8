"""Per-document log-likelihoods of every routing mode, from the experts' per-token log-probs.

The per-token scoring itself (what is scored, windows over long documents) lives in
models.scoring; the weights of prediction j come from the prefix of BOS plus j document tokens.

**Mixing.** The mixture ``log sum_k w_k p_k(y)`` needs ``p_k(y)`` only at the observed token y,
so mixing the gathered per-token log-probs (K, n) with per-position log-weights (n, K) is exact.
Each routing mode is a function returning those log-weights; ``mixed_token_log_probs`` mixes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from dfm.errors import DfmError
from dfm.mixing import mix_log_probs, top_k_log_weights
from dfm.posterior import prefix_log_posteriors
from models.scoring import Docs
from training.partition import Partition
from training.synthetic import SyntheticCorpus, SyntheticSpec


def mixed_token_log_probs(expert_log_probs: Sequence[Tensor], log_weights: Sequence[Tensor]) -> list[Tensor]:
    """Per document, (n,) log sum_k w_k(t) p_k(x_t): expert log-probs (K, n) mixed with weights (n, K)."""
    if len(expert_log_probs) != len(log_weights):
        raise DfmError(f"{len(expert_log_probs)} documents of expert log-probs but {len(log_weights)} of weights")
    out = []
    for lp, lw in zip(expert_log_probs, log_weights):
        if lp.shape != lw.T.shape:
            raise DfmError(f"expert log-probs {tuple(lp.shape)} do not match log-weights {tuple(lw.shape)} "
                           "(expected (K, n) and (n, K))")
        out.append(mix_log_probs(lp.T.unsqueeze(-1), lw.to(lp.dtype)).squeeze(-1))
    return out


def topk_log_weights(log_weights: Sequence[Tensor], k: int) -> list[Tensor]:
    """Top-k routing: keep each position's k largest weights, renormalised."""
    return [top_k_log_weights(lw, k) for lw in log_weights]


def bayes_log_weights(expert_log_probs: Sequence[Tensor], log_prior: Tensor) -> list[Tensor]:
    """Bayes routing of every document (dfm.posterior.prefix_log_posteriors)."""
    return [prefix_log_posteriors(lp, log_prior) for lp in expert_log_probs]


def centroid_log_weights(partition: Partition, docs: Docs, temperature: float) -> list[Tensor]:
    """c-BTM routing: softmax(-d_k^2 / T) of each prefix's tf-idf vector (the first t document
    tokens for prediction t; the empty prefix gives every non-empty cluster the same weight).

    Recomputed per prefix: O(n^2) per document, meant for evaluation-size documents.
    """
    return [partition.log_weights([ids[:t] for t in range(len(ids) + 1)], temperature).double() for ids in docs]


def oracle_log_weights(expert_log_probs: Sequence[Tensor], clusters: Sequence[int]) -> list[Tensor]:
    """The document's own cluster expert alone: log-weight 0 on it, -inf elsewhere."""
    out = []
    for lp, cluster in zip(expert_log_probs, clusters, strict=True):
        lw = torch.full(lp.T.shape, -math.inf, dtype=lp.dtype)
        lw[:, cluster] = 0.0
        out.append(lw)
    return out


def summarize(nll_per_doc: Sequence[Tensor], bytes_per_doc: Sequence[int]) -> dict:
    """Corpus-level numbers from per-token NLLs (nats, i.e. minus the log-probs above) per document:
    mean NLL per token, perplexity, bits per UTF-8 byte (total bits / total bytes), counts."""
    if len(nll_per_doc) != len(bytes_per_doc):
        raise DfmError(f"{len(nll_per_doc)} documents of NLLs but {len(bytes_per_doc)} byte counts")
    tokens = sum(t.numel() for t in nll_per_doc)
    total_bytes = sum(int(b) for b in bytes_per_doc)
    if tokens == 0 or total_bytes == 0:
        raise DfmError("nothing to summarize: the evaluation documents are empty")
    total = math.fsum(float(t.double().sum()) for t in nll_per_doc)
    if total < 0:
        raise DfmError("summarize expects negative log-likelihoods (>= 0); pass minus the token log-probs")
    return {"nll": total / tokens, "ppl": math.exp(total / tokens), "bpb": total / math.log(2.0) / total_bytes,
            "tokens": tokens, "documents": len(nll_per_doc)}


def doc_bits(nll_per_doc: Sequence[Tensor]) -> Tensor:
    """(N,) float64 total bits of each document (input of eval.equivalence)."""
    return torch.tensor([float(t.double().sum()) / math.log(2.0) for t in nll_per_doc], dtype=torch.float64)


def synthetic_corpus(config: dict) -> SyntheticCorpus | None:
    """The run's true generating process when it uses the embedded synthetic corpus, else None."""
    if config["data"]["dataset"] is not None:
        return None
    return SyntheticCorpus(SyntheticSpec.from_dict(config["synthetic"]))


def entropy_floor_bpb(corpus: SyntheticCorpus, texts: Sequence[str]) -> float:
    """True bits per byte of ``texts`` under the synthetic process. It includes the STOP event,
    the counterpart of the final EOS prediction scored above, so model bpb >= floor on average."""
    return corpus.entropy_floor_bpb(list(texts))
