"""Is the decentralized model as good as the compute-matched baseline? A paired bootstrap over documents.

The statistic is the corpus-level difference of bits per byte, decentralized minus baseline:
``delta = sum(model_bits) / sum(bytes) - sum(base_bits) / sum(bytes)`` (negative = decentralized
better). Each bootstrap resample draws documents with replacement and recomputes both ratios on
the same documents (paired); the 95% CI is the 2.5 and 97.5 percentiles of the resampled deltas.

Verdict, with ``margin = margin_fraction * baseline bpb`` and the CI ``[lo, hi]``, first rule that holds:

* ``equivalent``:   ``-margin <= lo`` and ``hi <= margin`` (the CI lies inside the margin: TOST);
* ``better``:       ``hi < 0`` (significantly better, possibly by more than the margin);
* ``worse``:        ``lo > 0`` (significantly worse, possibly by more than the margin);
* ``inconclusive``: otherwise (the CI holds 0 and reaches outside the margin: more documents needed).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dfm.errors import DfmError

#: Bound on resamples x documents drawn at once (memory), fixed so results never depend on it.
_DRAWS_PER_CHUNK = 1 << 22


def _as_vector(values: Tensor | Sequence[float], name: str) -> Tensor:
    vector = torch.as_tensor(values, dtype=torch.float64).flatten()
    if not torch.isfinite(vector).all():
        raise DfmError(f"{name} contains non-finite values: check the evaluation for -inf log-probs")
    return vector


def bootstrap_deltas(
    model_bits: Tensor, base_bits: Tensor, num_bytes: Tensor, resamples: int, generator: torch.Generator
) -> Tensor:
    """(resamples,) paired bpb differences on documents drawn with replacement."""
    n = num_bytes.numel()
    chunk = max(1, _DRAWS_PER_CHUNK // n)
    diff = model_bits - base_bits
    out = []
    for first in range(0, resamples, chunk):
        index = torch.randint(n, (min(chunk, resamples - first), n), generator=generator)
        out.append(diff[index].sum(1) / num_bytes[index].sum(1).clamp_min(1.0))
    return torch.cat(out)


def verdict(lo: float, hi: float, margin: float) -> str:
    """The rule of the module docstring."""
    if -margin <= lo and hi <= margin:
        return "equivalent"
    if hi < 0:
        return "better"
    if lo > 0:
        return "worse"
    return "inconclusive"


def equivalence(
    model_bits: Tensor | Sequence[float],
    base_bits: Tensor | Sequence[float],
    bytes: Tensor | Sequence[int],
    margin_fraction: float = 0.02,
    resamples: int = 2000,
    seed: int = 0,
) -> dict:
    """Paired bootstrap of delta bpb over documents (per-document total bits and UTF-8 bytes).

    Returns ``delta_bpb``, ``ci95`` [lo, hi], ``margin`` (in bpb), ``verdict`` and, for reference,
    ``model_bpb``, ``baseline_bpb``, ``documents`` and ``resamples``. Deterministic given ``seed``.
    """
    model = _as_vector(model_bits, "model bits")
    base = _as_vector(base_bits, "baseline bits")
    num_bytes = _as_vector(bytes, "byte counts")
    if not model.numel() == base.numel() == num_bytes.numel():
        raise DfmError(
            f"paired comparison needs the same documents: got {model.numel()} model, "
            f"{base.numel()} baseline and {num_bytes.numel()} byte counts"
        )
    if model.numel() == 0 or num_bytes.sum() <= 0:
        raise DfmError("equivalence needs at least one non-empty document")
    if resamples < 1:
        raise DfmError(f"bootstrap resamples must be >= 1, got {resamples}")
    if not margin_fraction >= 0:
        raise DfmError(f"equivalence margin fraction must be >= 0, got {margin_fraction}")
    total_bytes = num_bytes.sum()
    model_bpb, base_bpb = float(model.sum() / total_bytes), float(base.sum() / total_bytes)
    deltas = bootstrap_deltas(model, base, num_bytes, resamples, torch.Generator().manual_seed(seed))
    lo, hi = torch.quantile(deltas, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    margin = margin_fraction * base_bpb
    return {
        "delta_bpb": model_bpb - base_bpb,
        "ci95": [lo, hi],
        "margin": margin,
        "verdict": verdict(lo, hi, margin),
        "model_bpb": model_bpb,
        "baseline_bpb": base_bpb,
        "documents": model.numel(),
        "resamples": resamples,
    }
