"""The exact convergence study of the masked sampler (eval.convergence), checked against the
decomposition theorem, closed forms, and the real Monte-Carlo sampler."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from dfm.errors import DfmError
from dfm.masked_path import MaskedPath
from dfm.masked_sampler import euler_sample
from dfm.mixing import mix_log_probs
from dfm.routing import Routing, select_experts
from dfm.schedulers import scheduler
from eval.convergence import (
    MaskedToy,
    convergence_study,
    one_per_step_distribution,
    plot_convergence,
    sampler_distribution,
    total_variation,
    write_study,
)

TOY = MaskedToy.random(seed=0)  # V = 3, L = 5, K = 3: 1024 masked states, 243 sequences
P = TOY.target()


@pytest.mark.parametrize("routing", ["mixture", "switch"])
def test_one_position_per_step_recovers_the_source_exactly(routing):
    assert torch.allclose(one_per_step_distribution(TOY, 0.0, routing), P, rtol=0, atol=1e-9)
    # negative control: a router with error 0.3 no longer gives the source
    assert total_variation(P, one_per_step_distribution(TOY, 0.3, routing)) > 1e-3


def test_one_step_is_the_product_of_the_mixture_marginals():
    joint = P.reshape([TOY.vocab_size] * TOY.length)
    marginals = [joint.sum([j for j in range(TOY.length) if j != i]) for i in range(TOY.length)]
    product = marginals[0]
    for marginal in marginals[1:]:
        product = torch.outer(product.flatten(), marginal)
    one_step = sampler_distribution(TOY, 1, 0.0, "mixture")
    assert torch.allclose(one_step, product.flatten(), rtol=0, atol=1e-12)
    assert total_variation(P, one_step) > 0.1  # the sources' dependencies are lost


def test_tv_falls_with_steps_and_rises_with_router_error():
    steps, eps = [1, 2, 4, 8, 16], [0.0, 0.1, 0.3]
    for routing in ("mixture", "switch"):
        tv = [[total_variation(P, sampler_distribution(TOY, n, e, routing)) for e in eps] for n in steps]
        exact_router = [row[0] for row in tv]
        assert all(a > b for a, b in zip(exact_router, exact_router[1:])), (routing, exact_router)
        for n, row in zip(steps, tv):
            if routing == "switch" and n == 1:
                # The exception: one switch step reveals everything from ONE expert drawn at the all-masked
                # state, so the output is sum_k w_k prod_i P_k(x_i) with w = (1 - eps) pi + eps / K. eps only
                # re-weights K product distributions that are not the P_k, for which pi is not the TV-optimal
                # weighting; on this toy moving towards uniform weights comes slightly closer to P.
                assert row[0] > row[1] > row[2], row
            else:
                assert row[0] < row[1] < row[2], (routing, n, row)


def test_switch_equals_mixture_for_one_revealed_position():
    mixture = one_per_step_distribution(TOY, 0.1, "mixture")
    # drawing an expert from w and then a token from it is drawing the token from sum_k w_k p_k
    assert torch.allclose(one_per_step_distribution(TOY, 0.1, "switch"), mixture, rtol=0, atol=1e-12)
    # negative control: always the router's argmax expert is another distribution
    assert total_variation(mixture, one_per_step_distribution(TOY, 0.1, "top1")) > 1e-3


def test_monte_carlo_sampler_agrees_with_the_exact_distribution():
    posterior = mix_log_probs(TOY.expert_log_posteriors(), TOY.router_log_weights(0.0))  # (S, L, V)

    def denoise(xt, t):
        return posterior[TOY.state_index(xt)]

    n, vocab = 100_000, TOY.vocab_size
    start = torch.full((n, TOY.length), vocab)
    samples = euler_sample(
        denoise, start, MaskedPath(vocab, scheduler("linear")), 2, generator=torch.Generator().manual_seed(0)
    )
    empirical = torch.bincount(TOY.sequence_index(samples), minlength=vocab**TOY.length).double() / n
    # E TV(empirical, p) = 1/2 sum_y E|p^_y - p_y| <= 1/2 sum_y sqrt(p_y / n) <= 1/2 sqrt(S / n) (Jensen, then
    # Cauchy-Schwarz), S = 243 sequences: 0.0246 for n = 1e5. One sample moves TV by at most 1/n, so by
    # McDiarmid P(TV > E TV + 0.01) <= exp(-2 n 0.01^2) = exp(-20): the bound fails with probability < 1e-8.
    bound = 0.5 * math.sqrt(vocab**TOY.length / n) + 0.01
    assert total_variation(empirical, sampler_distribution(TOY, 2, 0.0, "mixture")) < bound
    # negative control: the one-step distribution is 0.18 away from the two-step one, far outside the bound
    assert total_variation(empirical, sampler_distribution(TOY, 1, 0.0, "mixture")) > bound


def test_monte_carlo_switch_agrees_with_the_exact_distribution():
    """The real switch routing (one expert per sequence and step, dfm.routing) on the cosine schedule."""
    log_p, log_w = TOY.expert_log_posteriors(), TOY.router_log_weights(0.1)
    generator = torch.Generator().manual_seed(1)

    def denoise(xt, t):
        state = TOY.state_index(xt)
        chosen = select_experts(log_w[state], Routing.SWITCH, generator=generator)
        return mix_log_probs(log_p[state], chosen.log_weights)

    n, vocab = 100_000, TOY.vocab_size
    samples = euler_sample(
        denoise, torch.full((n, TOY.length), vocab), MaskedPath(vocab, scheduler("cosine")), 3, generator=generator
    )
    empirical = torch.bincount(TOY.sequence_index(samples), minlength=vocab**TOY.length).double() / n
    bound = 0.5 * math.sqrt(vocab**TOY.length / n) + 0.01  # as in the mixture test above
    assert total_variation(empirical, sampler_distribution(TOY, 3, 0.1, "switch", "cosine")) < bound
    # negative control: mixture routing (independent reveals given X_t) is 0.1 away
    assert total_variation(empirical, sampler_distribution(TOY, 3, 0.1, "mixture", "cosine")) > bound


def test_study_reports_the_documented_shape_and_round_trips(tmp_path):
    study = convergence_study([1, 2, 4], [0.0, 0.1, 0.3])
    assert set(study) == {"tv", "kl", "rate_in_steps", "rate_in_eps", "one_position_per_step_tv", "modes", "toy"}
    assert set(study["modes"]) == {"mixture", "switch"}
    assert study["toy"] == {
        "vocab_size": 3,
        "length": 5,
        "num_sources": 3,
        "priors": TOY.priors.tolist(),
        "seed": 0,
        "scheduler": "linear",
    }
    for result in study["modes"].values():
        for key in ("tv", "kl"):
            assert result[key]["steps"] == [1, 2, 4] and result[key]["eps"] == [0.0, 0.1, 0.3]
            assert len(result[key]["values"]) == 3 and all(len(row) == 3 for row in result[key]["values"])
        assert 0 < result["rate_in_steps"] < math.inf and 0 < result["rate_in_eps"] < math.inf
        exact, *noisy = result["one_position_per_step_tv"]["values"]
        assert exact < 1e-12 and min(noisy) > 1e-3
    assert {k: study[k] for k in ("tv", "kl", "rate_in_steps", "rate_in_eps", "one_position_per_step_tv")} == study[
        "modes"
    ]["mixture"]
    two_steps = total_variation(P, sampler_distribution(TOY, 2, 0.0, "mixture"))
    assert study["tv"]["values"][1][0] == pytest.approx(two_steps, rel=1e-12)

    write_study(study, tmp_path / "study.json")
    assert json.loads((tmp_path / "study.json").read_text()) == study
    plot_convergence(study, tmp_path / "study.png")
    assert (tmp_path / "study.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.json", "study.png"]  # no temporary files left


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: sampler_distribution(TOY, 0, 0.0, "mixture"), "steps >= 1"),
        (lambda: sampler_distribution(TOY, 4, 1.5, "mixture"), "in [0, 1]"),
        (lambda: sampler_distribution(TOY, 4, 0.0, "bayes"), "mixture, switch, top1"),
        (lambda: convergence_study([1, 2, 4], [0.1, 0.3]), "eps 0"),
    ],
)
def test_bad_arguments_say_what_to_pass(call, message):
    with pytest.raises(DfmError, match=re.escape(message)):
        call()


def test_cli_writes_the_study_and_the_plot(tmp_path, capsys):
    from dfm.cli import main

    out, plot = tmp_path / "conv.json", tmp_path / "conv.png"
    assert (
        main(
            [
                "convergence",
                "--out",
                str(out),
                "--plot",
                str(plot),
                "--sampler-steps",
                "1",
                "2",
                "8",
                "--eps",
                "0",
                "0.1",
                "0.3",
            ]
        )
        == 0
    )
    study = json.loads(out.read_text())
    assert study["tv"]["steps"] == [1, 2, 8] and study["tv"]["eps"] == [0.0, 0.1, 0.3]
    assert study["rate_in_steps"] > 0 and set(study["modes"]) == {"mixture", "switch"}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mixture: TV at eps=0 N=1:" in capsys.readouterr().out
    assert main(["convergence", "--out", str(out), "--eps", "0.1", "0.3"]) == 2  # no exact router in the grid
