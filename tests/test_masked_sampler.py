"""The masked path's N-step sampler and the mixture of experts' posteriors on masked states,
checked against exact joint distributions over all 27 sequences of 3 tokens from 3 symbols."""

from __future__ import annotations

import itertools

import pytest
import torch

from dfm.errors import DfmError
from dfm.masked_path import MaskedPath
from dfm.masked_sampler import euler_sample
from dfm.mixing import mix_log_probs
from dfm.posterior import bayes_log_posterior
from dfm.schedulers import scheduler

V, N = 3, 3
M = V  # the mask id
STATES = list(itertools.product(range(V + 1), repeat=N))  # every X_t: each position a token or M


def _sequence_log_probs(joint: torch.Tensor) -> torch.Tensor:
    return (joint / joint.sum()).log().reshape(-1)  # row-major over (x1, x2, x3)


def _visible_log_prob(joint: torch.Tensor, state: tuple[int, ...]) -> torch.Tensor:
    """log p(the revealed tokens of ``state``), masked positions summed out."""
    p = joint / joint.sum()
    index = tuple(slice(None) if s == M else s for s in state)
    return p[index].sum().log()


def _conditionals(joint: torch.Tensor) -> torch.Tensor:
    """(len(STATES), N, V): log p(x_i = v | revealed tokens) of every state."""
    table = torch.empty(len(STATES), N, V, dtype=torch.float64)
    for row, state in enumerate(STATES):
        for i, v in itertools.product(range(N), range(V)):
            filled = tuple(v if j == i else s for j, s in enumerate(state))
            table[row, i, v] = _visible_log_prob(joint, filled) - _visible_log_prob(joint, state)
    return table


def _state_index(x: torch.Tensor) -> torch.Tensor:
    return sum(x[:, i] * (V + 1) ** (N - 1 - i) for i in range(N))


def _table_denoiser(table: torch.Tensor):
    return lambda xt, t: table[_state_index(xt)]


def test_mixture_of_expert_posteriors_is_the_global_posterior_on_every_masked_state():
    """The decomposition on the masked path: with weights P(k | X_t) proportional to
    pi_k p_k(revealed tokens), the mixture of the experts' clean-token posteriors is the posterior
    of the mixture pi_1 p_1 + pi_2 p_2, exactly; the prior weights alone (negative control) are not."""
    g = torch.Generator().manual_seed(0)
    joints = [torch.rand((V,) * N, generator=g, dtype=torch.float64) ** 4 for _ in range(2)]
    prior = torch.tensor([0.3, 0.7], dtype=torch.float64)
    mixture = sum(w * j / j.sum() for w, j in zip(prior, joints, strict=True))
    expert_tables = torch.stack([_conditionals(j) for j in joints], dim=1)  # (S, K, N, V)
    visible = torch.tensor([[_visible_log_prob(j, s) for j in joints] for s in STATES])  # (S, K)
    weights = bayes_log_posterior(prior.log(), visible.unsqueeze(-1))
    torch.testing.assert_close(mix_log_probs(expert_tables, weights), _conditionals(mixture), atol=1e-12, rtol=0)
    prior_only = mix_log_probs(expert_tables, prior.log().expand(len(STATES), -1))
    assert (prior_only - _conditionals(mixture)).abs().max() > 0.1


def _tv(samples: torch.Tensor, log_probs: torch.Tensor) -> float:
    index = sum(samples[:, i] * V ** (N - 1 - i) for i in range(N))
    empirical = torch.bincount(index, minlength=V**N).double() / len(samples)
    return 0.5 * float((empirical - log_probs.exp()).abs().sum())


def test_sampler_converges_to_the_data_as_steps_grow():
    """With the exact denoiser, 1 step draws every token from its marginal (far from the joint);
    many steps reveal one token at a time, a chain rule of the joint. 40,000 samples put the
    empirical total variation within about 0.01 of the truth; the bounds leave 3x room."""
    joint = torch.full((V,) * N, 0.01, dtype=torch.float64)
    for v in range(V):
        joint[v, v, v] = 1.0  # strongly dependent tokens
    truth = _sequence_log_probs(joint)
    denoise = _table_denoiser(_conditionals(joint))
    path = MaskedPath(V, scheduler("cosine"))
    start = torch.full((40_000, N), M)
    one_step = euler_sample(denoise, start, path, 1, generator=torch.Generator().manual_seed(1))
    many_steps = euler_sample(denoise, start, path, 200, generator=torch.Generator().manual_seed(2))
    marginals = _conditionals(joint)[_state_index(start[:1])][0]  # (N, V)
    independent = sum(marginals[i].reshape([V if j == i else 1 for j in range(N)]) for i in range(N)).reshape(-1)
    assert _tv(one_step, independent) < 0.03  # one step: the product of marginals, exactly in law
    assert _tv(one_step, truth) > 0.4
    assert _tv(many_steps, truth) < 0.03


def test_prompt_prefix_stays_and_every_mask_is_filled():
    joint = torch.rand((V,) * N, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    denoise = _table_denoiser(_conditionals(joint))
    path = MaskedPath(V, scheduler("linear"))
    start = torch.tensor([[2, M, M]] * 50)
    seen = []
    out = euler_sample(
        denoise,
        start,
        path,
        4,
        generator=torch.Generator().manual_seed(4),
        on_step=lambda step, x: seen.append((step, (x == M).sum().item())),
    )
    assert (out[:, 0] == 2).all() and (out != M).all()
    assert [s for s, _ in seen] == list(range(len(seen))) and seen[-1][1] == 0
    assert [m for _, m in seen] == sorted((m for _, m in seen), reverse=True)
    again = euler_sample(denoise, start, path, 4, generator=torch.Generator().manual_seed(4))
    assert torch.equal(out, again)


def test_sampler_needs_a_step():
    with pytest.raises(DfmError, match="at least 1 step"):
        euler_sample(lambda x, t: x, torch.full((1, N), M), MaskedPath(V, scheduler("linear")), 0)
