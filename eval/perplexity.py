"""Exact per-document log-likelihood of held-out documents, for one model and for every routing mode.

**What is scored.** Document d with token ids ``ids`` is read as ``[BOS] + ids + [EOS]`` (dfm has
one ``<|endoftext|>`` token, so BOS and EOS are the same id, ``bos_id``). Every document token and
the final EOS is predicted, from the first token on: ``len(ids) + 1`` predictions per document.
Prediction j (0-based) is the probability of ``s[j + 1]`` given the prefix ``s[:j + 1]``, where
``s`` is the scored sequence; prefix ``s[:j + 1]`` is BOS plus the first j document tokens.

**Long documents.** The model reads ``s[:-1]`` (n + 1 input positions). Window i covers input
positions ``[i * stride, i * stride + context)`` and scores only the predictions that no earlier
window scored, so every token is scored exactly once, with between ``context - stride + 1`` and
``context`` tokens of context (``stride == context``: independent blocks).

**Mixing.** The mixture ``log sum_k w_k p_k(y)`` needs ``p_k(y)`` only at the observed token y,
so mixing the gathered per-token log-probs (K, n) with per-position log-weights (n, K) is exact.
Each routing mode is a function returning those log-weights; ``mixed_token_log_probs`` mixes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from dfm.errors import DfmError
from dfm.mixing import mix_log_probs, normalize_log_weights, top_k_log_weights
from models.stacked import StackedLlama
from models.stacked import supports as supports_stacking
from training.partition import Partition
from training.synthetic import SyntheticCorpus, SyntheticSpec

Docs = Sequence[Sequence[int]]
#: (input_ids (B, T), attention_mask (B, T), targets (B, T)) -> per-position values (B, T, ...)
WindowFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def windows(num_inputs: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """``(start, end, first_scored)`` for every window over ``num_inputs`` input positions.

    Window i reads inputs ``[start, end)`` = ``[i * stride, min(i * stride + context, num_inputs))``
    and scores the predictions at positions ``[first_scored, end)``; together they cover
    ``[0, num_inputs)`` exactly once.
    """
    if context < 1:
        raise DfmError(f"evaluation context must be >= 1 token, got {context}")
    if not 1 <= stride <= context:
        raise DfmError(f"evaluation stride must be between 1 and the context ({context}), got {stride}")
    out, start, scored = [], 0, 0
    while scored < num_inputs:
        end = min(start + context, num_inputs)
        out.append((start, end, scored))
        scored, start = end, start + stride
    return out


def _windowed(fn: WindowFn, docs: Docs, *, bos_id: int, context: int, stride: int | None, batch_size: int,
              device: torch.device) -> list[Tensor]:
    """Run ``fn`` over the windows of every document (batched, right-padded) and return, per
    document, its values at the n + 1 scored positions in order, on the CPU."""
    if batch_size < 1:
        raise DfmError(f"evaluation batch size must be >= 1, got {batch_size}")
    stride = context if stride is None else stride
    sequences = [[bos_id, *ids, bos_id] for ids in docs]
    items = [(d, w, *span) for d, seq in enumerate(sequences)
             for w, span in enumerate(windows(len(seq) - 1, context, stride))]
    items.sort(key=lambda item: item[3] - item[2], reverse=True)  # similar lengths share a batch
    pieces: list[dict[int, Tensor]] = [{} for _ in docs]
    for first in range(0, len(items), batch_size):
        batch = items[first:first + batch_size]
        width = batch[0][3] - batch[0][2]
        inputs = torch.full((len(batch), width), bos_id, dtype=torch.long)
        targets = torch.full((len(batch), width), bos_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (d, _, start, end, _) in enumerate(batch):
            inputs[row, :end - start] = torch.tensor(sequences[d][start:end])
            targets[row, :end - start] = torch.tensor(sequences[d][start + 1:end + 1])
            mask[row, :end - start] = 1
        values = fn(inputs.to(device), mask.to(device), targets.to(device)).cpu()
        for row, (d, w, start, end, scored) in enumerate(batch):
            pieces[d][w] = values[row, scored - start:end - start]
    return [torch.cat([p[w] for w in range(len(p))]) for p in pieces]


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.inference_mode()
def token_log_probs(model: nn.Module, docs: Docs, *, bos_id: int, context: int, stride: int | None = None,
                    batch_size: int = 8) -> list[Tensor]:
    """Per document, the (n + 1,) float64 log p(token) of a Hugging Face causal LM (see module doc).

    ``stride`` defaults to ``context`` (independent windows).
    """

    def score(inputs: Tensor, mask: Tensor, targets: Tensor) -> Tensor:
        logits = model(input_ids=inputs, attention_mask=mask).logits.float()
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return (picked - logits.logsumexp(-1)).double()

    return _windowed(score, docs, bos_id=bos_id, context=context, stride=stride, batch_size=batch_size,
                     device=_device(model))


@torch.inference_mode()
def expert_token_log_probs(experts: Sequence[nn.Module], docs: Docs, *, bos_id: int, context: int,
                           stride: int | None = None, batch_size: int = 8) -> list[Tensor]:
    """Per document, (K, n + 1): each expert's own per-token log-probs.

    Llama experts sharing one configuration are scored together on the stacked engine (one
    batched forward for all K); others one after another.
    """
    if not supports_stacking(experts):
        per_expert = [token_log_probs(e, docs, bos_id=bos_id, context=context, stride=stride, batch_size=batch_size)
                      for e in experts]
        return [torch.stack(rows) for rows in zip(*per_expert)]
    engine = StackedLlama(experts)
    everyone = slice(0, len(experts))

    def score(inputs: Tensor, mask: Tensor, targets: Tensor) -> Tensor:
        engine.reset(inputs.shape[0])
        logits = engine.forward(everyone, inputs, mask, all_logits=True).float()  # (K, B, T, V)
        picked = logits.gather(-1, targets.expand(len(experts), -1, -1).unsqueeze(-1)).squeeze(-1)
        return (picked - logits.logsumexp(-1)).permute(1, 2, 0).double()  # (B, T, K)

    scored = _windowed(score, docs, bos_id=bos_id, context=context, stride=stride, batch_size=batch_size,
                       device=_device(experts[0]))
    return [values.T for values in scored]


@torch.inference_mode()
def router_log_weights(router: nn.Module, docs: Docs, *, bos_id: int, context: int, stride: int | None = None,
                       batch_size: int = 8) -> list[Tensor]:
    """Per document, (n + 1, K) float64 log P(k | prefix) for the prefix that predicts each token.

    The router reads the same ``[BOS] + ids`` inputs, windowed like the experts.
    """

    def weigh(inputs: Tensor, mask: Tensor, targets: Tensor) -> Tensor:
        return torch.log_softmax(router(inputs, mask).double(), dim=-1)

    return _windowed(weigh, docs, bos_id=bos_id, context=context, stride=stride, batch_size=batch_size,
                     device=_device(router))


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
    """Bayes routing: log P(k | x_<t) = log pi_k + sum_{s<t} log p_k(x_s | x_<s), normalised.

    The weight of prediction t uses the experts' own log-probs of the earlier predictions (an
    exclusive cumulative sum); prediction 0 (after BOS alone) gets the prior.
    """
    out = []
    for lp in expert_log_probs:
        before = torch.cat([torch.zeros_like(lp[:, :1]), torch.cumsum(lp[:, :-1], dim=1)], dim=1)  # s < t
        out.append(normalize_log_weights((log_prior.to(lp).unsqueeze(1) + before).T))
    return out


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
