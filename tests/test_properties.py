"""Property-based tests (hypothesis) of the core maths, in float64.

Random expert distributions (some tokens at probability 0, i.e. log-prob -inf) and random routing
weights (some experts at weight 0): the mixture is a normalised distribution and equals the
probability-space sum; top-k with k = K is the mixture; excluding experts is the mixture of the
rest; the Bayes posterior does not depend on how the evidence is chunked or ordered; sampling
filters keep a valid distribution on a subset of the support.

Tolerances: every quantity is a float64 sum of at most a few hundred terms of magnitude <= ~1e3,
so rounding stays below ~1e-12 absolute; 1e-9 leaves room without hiding a real error (a wrong
weight or a dropped expert changes values by far more).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dfm.errors import DfmError
from dfm.mixing import exclude_log_weights, mix_log_probs, normalize_log_weights, top_k_log_weights
from dfm.posterior import BayesPosterior, bayes_log_posterior
from dfm.sampling import filter_log_probs, sample_tokens

ATOL = 1e-9
EXAMPLES = settings(max_examples=40, deadline=None)
NEG_INF = float("-inf")


@st.composite
def experts(draw, min_experts: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K, V) normalised expert log-probs with some -inf entries, and (B, K) log-weights with
    some -inf entries (at least one finite weight per row)."""
    batch = draw(st.integers(1, 3))
    num_experts = draw(st.integers(min_experts, 5))
    vocab = draw(st.integers(2, 12))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 40.0]))  # 40: nearly one-hot, exp underflows
    zero_prob = draw(st.sampled_from([0.0, 0.3]))
    zero_weight = draw(st.sampled_from([0.0, 0.4]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logits = scale * torch.randn(batch, num_experts, vocab, generator=g, dtype=torch.float64)
    impossible = torch.rand(batch, num_experts, vocab, generator=g) < zero_prob
    impossible[..., 0] = False  # every expert keeps at least one possible token
    log_probs = torch.log_softmax(logits.masked_fill(impossible, NEG_INF), dim=-1)
    weights = scale * torch.randn(batch, num_experts, generator=g, dtype=torch.float64)
    unused = torch.rand(batch, num_experts, generator=g) < zero_weight
    unused[torch.arange(batch), torch.randint(num_experts, (batch,), generator=g)] = False
    return log_probs, normalize_log_weights(weights.masked_fill(unused, NEG_INF))


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to ATOL, with -inf only where the other side is -inf too (never NaN)."""
    assert not a.isnan().any() and not b.isnan().any()
    assert torch.equal(a == NEG_INF, b == NEG_INF)
    assert torch.allclose(a, b, rtol=0, atol=ATOL), (a - b).abs().nan_to_num(0).max()


@EXAMPLES
@given(experts())
def test_mixture_is_normalised_and_equals_the_probability_sum(case) -> None:
    log_probs, log_weights = case
    mixed = mix_log_probs(log_probs, log_weights)
    assert mixed.shape == (log_probs.shape[0], log_probs.shape[2])
    assert torch.allclose(torch.logsumexp(mixed, -1), torch.zeros(mixed.shape[0], dtype=torch.float64), atol=ATOL)
    direct = (log_weights.exp().unsqueeze(-1) * log_probs.exp()).sum(1)
    assert torch.allclose(mixed.exp(), direct, rtol=0, atol=ATOL)
    # a token gets probability 0 exactly when every expert with weight > 0 gives it 0
    weighted = torch.isfinite(log_weights).unsqueeze(-1) & torch.isfinite(log_probs)
    assert torch.equal(torch.isfinite(mixed), weighted.any(1))


@EXAMPLES
@given(experts())
def test_top_k_with_k_equal_to_k_is_the_mixture(case) -> None:
    log_probs, log_weights = case
    num_experts = log_weights.shape[-1]
    assert_close(
        mix_log_probs(log_probs, top_k_log_weights(log_weights, num_experts)), mix_log_probs(log_probs, log_weights)
    )


@EXAMPLES
@given(experts(), st.integers(1, 5))
def test_top_k_keeps_the_k_largest_renormalised(case, k) -> None:
    log_probs, log_weights = case
    k = min(k, log_weights.shape[-1])
    kept = top_k_log_weights(log_weights, k)
    assert torch.allclose(torch.logsumexp(kept, -1), torch.zeros(kept.shape[0], dtype=torch.float64), atol=ATOL)
    assert ((torch.isfinite(kept)).sum(-1) <= k).all()
    for row, weights in zip(kept, log_weights):
        on = torch.isfinite(row)
        assert torch.isfinite(weights[on]).all()
        if (~on).any():  # nothing dropped outweighs anything kept
            assert weights[~on].max() <= weights[on].min()
        # renormalising keeps the ratios of the kept weights
        assert torch.allclose(row[on] - row[on].max(), weights[on] - weights[on].max(), rtol=0, atol=ATOL)
    assert_close(torch.logsumexp(mix_log_probs(log_probs, kept), -1), torch.zeros(kept.shape[0], dtype=torch.float64))


@EXAMPLES
@given(experts(min_experts=2), st.data())
def test_exclusion_is_the_mixture_of_the_rest(case, data) -> None:
    log_probs, log_weights = case
    num_experts = log_weights.shape[-1]
    excluded = data.draw(st.lists(st.integers(0, num_experts - 1), min_size=1, max_size=num_experts - 1, unique=True))
    rest = [e for e in range(num_experts) if e not in excluded]
    if not torch.isfinite(log_weights[:, rest]).any(-1).all():
        with pytest.raises(DfmError, match="zero weight"):  # a row whose remaining experts all have weight 0
            exclude_log_weights(log_weights, excluded)
        return
    routed = exclude_log_weights(log_weights, excluded)
    assert (routed[:, excluded] == NEG_INF).all()
    assert_close(
        mix_log_probs(log_probs, routed), mix_log_probs(log_probs[:, rest], normalize_log_weights(log_weights[:, rest]))
    )


@st.composite
def evidence(draw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A log-prior (K,), per-token expert log-likelihoods (B, K, T) and a padding mask (B, T).

    Some experts give some real tokens probability 0 (-inf), never all experts the same token;
    padded positions may hold anything, -inf included (they must not count)."""
    batch = draw(st.integers(1, 3))
    num_experts = draw(st.integers(1, 5))
    length = draw(st.integers(1, 24))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    log_prior = torch.log_softmax(torch.randn(num_experts, generator=g, dtype=torch.float64), -1)
    token_log_probs = -torch.rand(batch, num_experts, length, generator=g, dtype=torch.float64) * 8
    impossible = torch.rand(batch, num_experts, length, generator=g) < draw(st.sampled_from([0.0, 0.05]))
    impossible[:, 0] = False  # expert 0 explains every real token
    token_log_probs = token_log_probs.masked_fill(impossible, NEG_INF)
    mask = (torch.rand(batch, length, generator=g) < draw(st.sampled_from([1.0, 0.7]))).long()
    padding_values = torch.full_like(token_log_probs, NEG_INF) if draw(st.booleans()) else token_log_probs
    token_log_probs = torch.where(mask.bool().unsqueeze(1), token_log_probs, padding_values)
    return log_prior, token_log_probs, mask


def one_token_at_a_time(log_prior: torch.Tensor, token_log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    posterior = BayesPosterior(log_prior, token_log_probs.shape[0])
    for t in range(token_log_probs.shape[-1]):
        real = mask[:, t].bool().unsqueeze(-1)
        posterior.update(torch.where(real, token_log_probs[..., t], 0.0))
    return posterior.log_posterior


@EXAMPLES
@given(evidence(), st.data())
def test_bayes_update_is_order_consistent(case, data) -> None:
    log_prior, token_log_probs, mask = case
    one_shot = bayes_log_posterior(log_prior, token_log_probs, mask)
    assert_close(torch.logsumexp(one_shot, -1), torch.zeros(one_shot.shape[0], dtype=torch.float64))
    assert_close(one_token_at_a_time(log_prior, token_log_probs, mask), one_shot)
    cut = data.draw(st.integers(0, token_log_probs.shape[-1]))
    chunked = BayesPosterior(log_prior, token_log_probs.shape[0])
    chunked.update_prefix(token_log_probs[..., :cut], mask[:, :cut])
    chunked.update_prefix(token_log_probs[..., cut:], mask[:, cut:])
    assert_close(chunked.log_posterior, one_shot)
    # the expert that explains every token keeps a positive posterior; an expert that gave a
    # real token probability 0 has posterior exactly 0
    assert torch.isfinite(one_shot[:, 0]).all()
    ruled_out = ((token_log_probs == NEG_INF) & mask.bool().unsqueeze(1)).any(-1)
    assert torch.equal(one_shot == NEG_INF, ruled_out)


@EXAMPLES
@given(evidence(), st.integers(0, 2**31 - 1))
def test_bayes_posterior_ignores_the_order_of_evidence_and_follows_expert_relabelling(case, seed) -> None:
    log_prior, token_log_probs, mask = case
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(token_log_probs.shape[-1], generator=g)
    reference = bayes_log_posterior(log_prior, token_log_probs, mask)
    assert_close(bayes_log_posterior(log_prior, token_log_probs[..., order], mask[:, order]), reference)
    relabel = torch.randperm(log_prior.shape[0], generator=g)
    assert_close(bayes_log_posterior(log_prior[relabel], token_log_probs[:, relabel], mask), reference[:, relabel])


@EXAMPLES
@given(experts(), st.floats(0.05, 5.0), st.integers(0, 14), st.floats(0.01, 1.0))
def test_sampling_filters_keep_a_valid_distribution(case, temperature, top_k, top_p) -> None:
    log_probs, log_weights = case
    scores = mix_log_probs(log_probs, log_weights)
    filtered = filter_log_probs(scores, temperature, top_k, top_p)
    assert not filtered.isnan().any()
    assert torch.allclose(torch.logsumexp(filtered, -1), torch.zeros(scores.shape[0], dtype=torch.float64), atol=ATOL)
    kept = torch.isfinite(filtered)
    assert not (kept & ~torch.isfinite(scores)).any()  # never revives an impossible token
    assert kept.gather(-1, scores.argmax(-1, keepdim=True)).all()  # the most likely token always stays
    if 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, -1).values[:, -1:]
        assert not (kept & (scores < kth)).any()
    # kept tokens keep their tempered ratios, and hold at least top_p of the tempered mass
    tempered = torch.log_softmax(scores / temperature, -1)
    for row in range(scores.shape[0]):
        on = kept[row]
        ratios = filtered[row, on] - filtered[row, on].max()
        assert torch.allclose(ratios, tempered[row, on] - tempered[row, on].max(), rtol=0, atol=1e-7)
        if top_k == 0:
            assert tempered[row, on].exp().sum() >= top_p - 1e-9
    # sample_tokens filters in float32: what it draws lies in the float32 filter's support
    kept32 = torch.isfinite(filter_log_probs(scores.float(), temperature, top_k, top_p))
    drawn = sample_tokens(scores, torch.Generator().manual_seed(0), temperature, top_k, top_p)
    assert kept32.gather(-1, drawn.unsqueeze(-1)).all()


def test_no_filtering_is_the_identity() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.log_softmax(3 * torch.randn(4, 9, generator=g, dtype=torch.float64), -1)
    scores[0, 2] = NEG_INF
    scores = torch.log_softmax(scores, -1)
    assert_close(filter_log_probs(scores), scores)
    assert math.isinf(float(filter_log_probs(scores, 0.5, 3, 0.9)[0, 2]))
