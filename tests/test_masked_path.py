"""The masked (absorbing-state) path: schedulers, sampling, velocity, and the ELBO loss, which is
exact (equal to -log p) when the model is the data's true conditionals."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from dfm.errors import DfmError
from dfm.loss import masked_dfm_loss, masked_elbo
from dfm.masked_path import MaskedPath
from dfm.schedulers import SCHEDULERS, scheduler

V, N = 3, 3  # a joint over all 27 sequences of 3 tokens from 3 symbols


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_scheduler_ends_and_derivative(name):
    s = scheduler(name)
    ends = s.kappa(torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(ends, torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-15, rtol=0)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(s.kappa(t).sum(), t)
    torch.testing.assert_close(s.d_kappa(t.detach()), grad, atol=1e-12, rtol=0)
    assert (s.d_kappa(t.detach()) > 0).all()


def test_unknown_scheduler_is_named():
    with pytest.raises(DfmError, match="unknown scheduler 'square'"):
        scheduler("square")


def test_sample_masks_each_token_with_probability_one_minus_kappa():
    path = MaskedPath(V, scheduler("cosine"))
    x1 = torch.randint(0, V, (400, 500), generator=torch.Generator().manual_seed(0))
    assert (path.sample(x1, torch.zeros(400)) == path.mask_id).all()
    assert torch.equal(path.sample(x1, torch.ones(400)), x1)
    t = torch.full((400,), 0.4)
    xt = path.sample(x1, t, generator=torch.Generator().manual_seed(1))
    kept = xt != path.mask_id
    assert torch.equal(xt[kept], x1[kept])
    # 200,000 Bernoulli draws: the kept fraction has a standard deviation below 0.0012; allow 5 of them
    assert abs(kept.double().mean().item() - path.scheduler.kappa(torch.tensor(0.4)).item()) < 0.006


def test_velocity_is_a_rate_at_masked_positions_only():
    path = MaskedPath(V, scheduler("linear"))
    probs = torch.tensor([[[0.2, 0.3, 0.5], [0.6, 0.2, 0.2]]], dtype=torch.float64)
    xt = torch.tensor([[path.mask_id, 1]])
    t = torch.tensor([0.5], dtype=torch.float64)
    u = path.velocity(probs, xt, t)
    torch.testing.assert_close(u.sum(-1), torch.zeros(1, 2, dtype=torch.float64), atol=1e-15, rtol=0)
    assert (u[0, 1] == 0).all()
    rate = 1 / (1 - 0.5)  # linear: d_kappa = 1, kappa = t
    torch.testing.assert_close(u[0, 0], rate * torch.tensor([0.2, 0.3, 0.5, -1.0], dtype=torch.float64))
    h = torch.tensor([1e-6], dtype=torch.float64)
    torch.testing.assert_close(path.reveal_probability(t, t + h) / h, path.loss_weight(t), rtol=1e-5, atol=0)


def _joint(seed: int) -> torch.Tensor:
    return torch.rand((V,) * N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.05


def _conditional_logits(joint: torch.Tensor, xt: torch.Tensor, mask_id: int) -> torch.Tensor:
    """log p(x_i = v | the revealed tokens of xt) for every position i, from the joint table."""
    p = joint / joint.sum()
    for i, token in enumerate(xt.tolist()):
        if token != mask_id:
            keep = torch.zeros(V, dtype=torch.float64)
            keep[token] = 1
            p = p * keep.reshape([V if j == i else 1 for j in range(N)])
    dims = range(N)
    return torch.stack([p.sum(dim=[j for j in dims if j != i]).log() for i in dims])


def _expected_elbo(path: MaskedPath, logits_of, x1: torch.Tensor) -> float:
    """E over t ~ U(0, 1) (20-point Gauss-Legendre) and every mask pattern (exactly) of the ELBO integrand."""
    nodes, weights = np.polynomial.legendre.leggauss(20)
    total = 0.0
    for node, weight in zip((nodes + 1) / 2, weights / 2, strict=True):
        t = torch.tensor([node], dtype=torch.float64)
        kappa = path.scheduler.kappa(t).item()
        for masked in itertools.product([False, True], repeat=N):
            xt = torch.where(torch.tensor(masked), torch.full_like(x1, path.mask_id), x1)
            prob = math.prod((1 - kappa) if m else kappa for m in masked)
            elbo = masked_elbo(logits_of(xt).unsqueeze(0), x1.unsqueeze(0), xt.unsqueeze(0), t, path)
            total += weight * prob * elbo.item()
    return total


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_elbo_is_exact_for_the_true_conditionals(name):
    """The bound is tight for the exact denoiser: every reveal order is a chain rule of the same joint."""
    path = MaskedPath(V, scheduler(name))
    joint = _joint(0)
    p = joint / joint.sum()
    for x1 in [torch.tensor(s) for s in itertools.product(range(V), repeat=N)][::4]:
        bound = _expected_elbo(path, lambda xt: _conditional_logits(joint, xt, path.mask_id), x1)
        assert bound == pytest.approx(-math.log(p[tuple(x1.tolist())].item()), abs=1e-9)


def test_elbo_of_a_wrong_model_exceeds_the_entropy():
    """Negative control: a model that ignores the context (the marginals) pays more than H(p) on average."""
    path = MaskedPath(V, scheduler("linear"))
    joint = _joint(1)
    p = joint / joint.sum()
    marginals = _conditional_logits(joint, torch.full((N,), path.mask_id), path.mask_id)
    sequences = [torch.tensor(s) for s in itertools.product(range(V), repeat=N)]
    entropy = -sum(p[tuple(s.tolist())].item() * math.log(p[tuple(s.tolist())].item()) for s in sequences)
    expected = sum(p[tuple(s.tolist())].item() * _expected_elbo(path, lambda xt: marginals, s) for s in sequences)
    assert expected > entropy + 0.01


def test_masked_loss_is_the_bound_per_real_token():
    path = MaskedPath(V, scheduler("cosine"))
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, V, generator=g, dtype=torch.float64)
    x1 = torch.randint(0, V, (2, 4), generator=g)
    xt = torch.tensor([[V, 1, V, V], [V, V, 2, 0]])
    x1[0, 1], x1[1, 2], x1[1, 3] = 1, 2, 0
    t = torch.tensor([0.3, 0.6], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    elbo = masked_elbo(logits, x1, xt, t, path, mask)
    nll = -logits.log_softmax(-1).gather(-1, x1.unsqueeze(-1)).squeeze(-1)
    expected = torch.stack(
        [path.loss_weight(t[0]) * (nll[0, 0] + nll[0, 2]), path.loss_weight(t[1]) * (nll[1, 0] + nll[1, 1])]
    )
    torch.testing.assert_close(elbo, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(masked_dfm_loss(logits, x1, xt, t, path, mask), expected.sum() / 7, atol=1e-12, rtol=0)
