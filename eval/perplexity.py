"""Per-document log-likelihoods of every routing mode, from the experts' per-token log-probs.

The per-token scoring itself (what is scored, windows over long documents) lives in
models.scoring; the weights of prediction j come from the prefix of BOS plus j document tokens.

**Mixing.** The mixture ``log sum_k w_k p_k(y)`` needs ``p_k(y)`` only at the observed token y,
so mixing the gathered per-token log-probs (K, n) with per-position log-weights (n, K) is exact.
Every routing mode's log-weights come from its weigher (``models.weighers``, shared with
decoding); ``mixed_token_log_probs`` mixes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from dfm.errors import DfmError
from dfm.mixing import mix_log_probs
from training.run_config import RunConfig
from training.synthetic import SyntheticCorpus, SyntheticSpec


def mixed_token_log_probs(expert_log_probs: Sequence[Tensor], log_weights: Sequence[Tensor]) -> list[Tensor]:
    """Per document, (n,) log sum_k w_k(t) p_k(x_t): expert log-probs (K, n) mixed with weights (n, K)."""
    if len(expert_log_probs) != len(log_weights):
        raise DfmError(f"{len(expert_log_probs)} documents of expert log-probs but {len(log_weights)} of weights")
    out = []
    for lp, lw in zip(expert_log_probs, log_weights):
        if lp.shape != lw.T.shape:
            raise DfmError(
                f"expert log-probs {tuple(lp.shape)} do not match log-weights {tuple(lw.shape)} "
                "(expected (K, n) and (n, K))"
            )
        out.append(mix_log_probs(lp.T.unsqueeze(-1), lw.to(lp.dtype)).squeeze(-1))
    return out


def summarize(nll_per_doc: Sequence[Tensor], bytes_per_doc: Sequence[int]) -> dict:
    """Corpus-level numbers from per-token NLLs (nats, i.e. minus the log-probs above) per document:
    mean NLL per token, perplexity, bits per UTF-8 byte (total bits / total bytes), counts."""
    if len(nll_per_doc) != len(bytes_per_doc):
        raise DfmError(f"{len(nll_per_doc)} documents of NLLs but {len(bytes_per_doc)} byte counts")
    return summarize_totals(
        [float(t.double().sum()) for t in nll_per_doc], [t.numel() for t in nll_per_doc], bytes_per_doc
    )


def summarize_totals(
    nats_per_doc: Sequence[float], tokens_per_doc: Sequence[int], bytes_per_doc: Sequence[int]
) -> dict:
    """``summarize`` from each document's total NLL in nats (or its ELBO) and its token count."""
    if not len(nats_per_doc) == len(tokens_per_doc) == len(bytes_per_doc):
        raise DfmError(
            f"{len(nats_per_doc)} documents of NLLs, {len(tokens_per_doc)} token counts and "
            f"{len(bytes_per_doc)} byte counts: give one of each per document"
        )
    tokens = sum(int(t) for t in tokens_per_doc)
    total_bytes = sum(int(b) for b in bytes_per_doc)
    if tokens == 0 or total_bytes == 0:
        raise DfmError("nothing to summarize: the evaluation documents are empty")
    total = math.fsum(nats_per_doc)
    if total < 0:
        raise DfmError("summarize expects negative log-likelihoods (>= 0); pass minus the token log-probs")
    return {
        "nll": total / tokens,
        "ppl": math.exp(total / tokens),
        "bpb": total / math.log(2.0) / total_bytes,
        "tokens": tokens,
        "documents": len(nats_per_doc),
    }


def doc_bits(nll_per_doc: Sequence[Tensor]) -> Tensor:
    """(N,) float64 total bits of each document (input of eval.equivalence)."""
    return torch.tensor([float(t.double().sum()) / math.log(2.0) for t in nll_per_doc], dtype=torch.float64)


def synthetic_corpus(config: RunConfig) -> SyntheticCorpus | None:
    """The run's true generating process when it uses the embedded synthetic corpus, else None."""
    if config.data.dataset is not None:
        return None
    return SyntheticCorpus(SyntheticSpec.from_dict(config.synthetic))


def entropy_floor_bpb(corpus: SyntheticCorpus, texts: Sequence[str]) -> float:
    """True bits per byte of ``texts`` under the synthetic process. It includes the STOP event,
    the counterpart of the final EOS prediction scored above, so model bpb >= floor on average."""
    return corpus.entropy_floor_bpb(list(texts))
