"""How good is the router? Accuracy by prefix length, KL to the Bayes posterior, calibration; and inference compute.

Inputs are the per-document (n + 1, K) log-weight tensors of eval.perplexity (row j: the prefix
of BOS plus the first j document tokens), so nothing here runs a model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dfm.errors import DfmError
from dfm.mixing import check_k


def prefix_lengths(longest: int) -> list[int]:
    """1, 2, 4, ... up to ``longest``."""
    out, length = [], 1
    while length <= longest:
        out.append(length)
        length *= 2
    return out


def accuracy_by_prefix_length(
    log_weights: Sequence[Tensor], clusters: Sequence[int], max_length: int | None = None
) -> dict:
    """Accuracy of argmax_k P(k | prefix) against the document's cluster, for prefixes of
    1, 2, 4, ... document tokens (up to ``max_length``, e.g. the context; default the longest).

    Only documents with at least that many tokens count at a length; ``counts`` says how many.
    Lengths no document reaches are left out.
    """
    if len(log_weights) != len(clusters):
        raise DfmError(f"{len(log_weights)} documents of router weights but {len(clusters)} clusters")
    longest = max((lw.shape[0] - 1 for lw in log_weights), default=0)
    lengths = prefix_lengths(longest if max_length is None else min(longest, max_length))
    accuracy, counts = [], []
    for length in lengths:
        hits = [int(lw[length].argmax()) == c for lw, c in zip(log_weights, clusters) if lw.shape[0] > length]
        counts.append(len(hits))
        accuracy.append(sum(hits) / len(hits))
    return {"lengths": lengths, "accuracy": accuracy, "counts": counts}


def mean_kl(p_log_weights: Sequence[Tensor], q_log_weights: Sequence[Tensor]) -> float:
    """Mean over all positions of KL(p || q) in nats (e.g. p = Bayes posterior, q = router)."""
    p = torch.cat(list(p_log_weights)).double()
    q = torch.cat(list(q_log_weights)).double()
    if p.shape != q.shape or p.numel() == 0:
        raise DfmError(f"KL needs log-weights of the same non-empty shape, got {tuple(p.shape)} and {tuple(q.shape)}")
    terms = torch.where(p > -torch.inf, p.exp() * (p - q), torch.zeros_like(p))  # 0 log 0 = 0
    return float(terms.sum(-1).mean())


def expected_calibration_error(log_weights: Sequence[Tensor], clusters: Sequence[int], bins: int = 15) -> float:
    """ECE of the top-1 prediction over all positions: sum_b (n_b / N) |accuracy_b - confidence_b|,
    with ``bins`` equal-width confidence bins (i / bins, (i + 1) / bins]."""
    if len(log_weights) != len(clusters) or not log_weights:
        raise DfmError(f"{len(log_weights)} documents of router weights but {len(clusters)} clusters")
    lw = torch.cat(list(log_weights)).double()
    truth = torch.cat([torch.full((w.shape[0],), c, dtype=torch.long) for w, c in zip(log_weights, clusters)])
    confidence, predicted = lw.max(-1)
    confidence = confidence.exp()
    correct = (predicted == truth).double()
    bin_of = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    count = torch.bincount(bin_of, minlength=bins).double()
    gap = (torch.bincount(bin_of, correct, minlength=bins) - torch.bincount(bin_of, confidence, minlength=bins)).abs()
    return float(gap.sum() / count.sum())


def router_quality(
    router_log_weights: Sequence[Tensor],
    bayes_log_weights: Sequence[Tensor],
    clusters: Sequence[int],
    max_length: int | None = None,
    bins: int = 15,
) -> dict:
    """Accuracy by prefix length, mean KL(Bayes posterior || router), and ECE in one dict."""
    return {
        "accuracy_by_length": accuracy_by_prefix_length(router_log_weights, clusters, max_length),
        "kl_bayes_router": mean_kl(bayes_log_weights, router_log_weights),
        "ece": expected_calibration_error(router_log_weights, clusters, bins),
    }


def inference_accounting(
    *, expert_params: Sequence[int], router_params: int = 0, baseline_params: int = 0, top_k: Sequence[int] = (1, 2)
) -> dict:
    """Inference FLOPs per token (2 x params of the networks run) of every routing mode, and the
    parameter counts; training FLOPs are compute matching's (``training.lm_training.compute_matching``).

    Per token: mixture/bayes/centroid run all K experts, ``top{k}`` k experts (k x the mean
    expert size), switch and oracle one; mixture, top-k and switch also run the router (bayes,
    centroid and oracle need none; centroid's tf-idf cost is not counted).
    """
    if not expert_params:
        raise DfmError("give one parameter count per expert (got none)")
    num_experts = len(expert_params)
    for k in top_k:
        check_k(k, num_experts)
    all_experts = sum(expert_params)
    mean_expert = all_experts / num_experts
    router = 2 * router_params
    inference = {"mixture": 2 * all_experts + router, "bayes": 2 * all_experts, "centroid": 2 * all_experts}
    inference.update({f"top{k}": 2 * k * mean_expert + router for k in top_k})
    inference.update({"switch": 2 * mean_expert + router, "oracle": 2 * mean_expert, "baseline": 2 * baseline_params})
    return {
        "inference_flops_per_token": inference,
        "parameters": {"experts": all_experts, "router": router_params, "baseline": baseline_params},
    }
