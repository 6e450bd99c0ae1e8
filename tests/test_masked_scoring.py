"""The Monte-Carlo ELBO of a sequence: its expectation is the path's bound, which equals -log p
for the exact denoiser, and exceeds the entropy on average for a denoiser that ignores context."""

from __future__ import annotations

import itertools

import pytest
import torch

from dfm.elbo import elbo_nats
from dfm.errors import DfmError
from dfm.masked_path import MaskedPath
from dfm.schedulers import scheduler
from tests.test_masked_sampler import N, V, _conditionals, _sequence_log_probs, _table_denoiser


def test_elbo_estimate_converges_to_the_nll_for_the_exact_denoiser():
    joint = torch.rand((V,) * N, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.1
    nll = -_sequence_log_probs(joint)
    denoise = _table_denoiser(_conditionals(joint))
    path = MaskedPath(V, scheduler("linear"))
    g = torch.Generator().manual_seed(6)
    for index, sequence in enumerate(itertools.product(range(V), repeat=N)):
        if index % 5:
            continue
        estimate = elbo_nats(denoise, torch.tensor(sequence), path, samples=4000, generator=g)
        # draws spread by about a nat; 4000 stratified ones leave a standard error near 0.005
        # (measured: largest error 0.014 over all 27 sequences), so 0.04 is about 8 of them
        assert estimate == pytest.approx(float(nll[index]), abs=0.04)


def test_elbo_of_a_context_free_denoiser_is_larger_on_average():
    joint = torch.full((V,) * N, 0.02, dtype=torch.float64)
    for v in range(V):
        joint[v, v, v] = 1.0
    p = (joint / joint.sum()).reshape(-1)
    marginals = _conditionals(joint)[-1]  # the last state is all masks: each position's marginal
    path = MaskedPath(V, scheduler("cosine"))
    g = torch.Generator().manual_seed(7)
    sequences = [torch.tensor(s) for s in itertools.product(range(V), repeat=N)]
    exact = _table_denoiser(_conditionals(joint))
    wrong = lambda xt, t: marginals.expand(xt.shape[0], -1, -1)  # noqa: E731 - ignores the revealed tokens
    expected = [
        sum(float(p[i]) * elbo_nats(d, s, path, 400, g) for i, s in enumerate(sequences)) for d in (exact, wrong)
    ]
    entropy = -float((p * p.log()).sum())
    assert expected[0] == pytest.approx(entropy, abs=0.05)
    assert expected[1] > entropy + 0.5


def test_elbo_needs_a_sample():
    with pytest.raises(DfmError, match="at least 1 sample"):
        elbo_nats(lambda x, t: x, torch.zeros(N, dtype=torch.long), MaskedPath(V, scheduler("linear")), samples=0)
