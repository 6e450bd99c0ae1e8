import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from dfm import (
    ARPath,
    BayesPosterior,
    DecodeConfig,
    DfmError,
    Routing,
    bayes_log_posterior,
    check_velocity,
    decode_step,
    dfm_loss,
    exclude_log_weights,
    filter_log_probs,
    generate,
    mix_log_probs,
    normalize_log_weights,
    parse_routing,
    sample_tokens,
    select_experts,
    top_k_log_weights,
)
from tests.toy import MarkovPool

LENGTH = 5


def one_row(prefix):
    """A BOS-prefixed single-row batch and its mask."""
    tokens = torch.tensor([[0, *prefix]])
    return tokens, torch.ones_like(tokens)


def prefixes(vocab, max_len):
    for n in range(max_len):
        yield from itertools.product(range(vocab), repeat=n)


def test_bayes_weighted_mixture_equals_true_marginal_on_every_prefix():
    pool = MarkovPool(num_experts=3, vocab_size=3, seed=1)
    prior = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    for prefix in prefixes(3, LENGTH):
        tokens, mask = one_row(prefix)
        log_w = prior.log() + pool.prefix_log_likelihood(tokens, mask, [0, 1, 2])
        log_w = normalize_log_weights(log_w)
        mixed = mix_log_probs(pool.next_token_log_probs(tokens, mask, [0, 1, 2]), log_w)
        truth = pool.marginal_next(list(prefix), prior, LENGTH)
        torch.testing.assert_close(mixed[0].exp(), truth, atol=1e-6, rtol=0)


def test_uniform_weights_do_not_give_the_marginal():
    pool = MarkovPool(num_experts=3, vocab_size=3, seed=1)
    prior = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    worst = 0.0
    for prefix in prefixes(3, 3):
        tokens, mask = one_row(prefix)
        uniform = torch.full((1, 3), -math.log(3), dtype=torch.float64)
        mixed = mix_log_probs(pool.next_token_log_probs(tokens, mask, [0, 1, 2]), uniform)
        truth = pool.marginal_next(list(prefix), prior, LENGTH)
        worst = max(worst, (mixed[0].exp() - truth).abs().max().item())
    assert worst > 1e-2


def test_incremental_bayes_equals_one_shot():
    g = torch.Generator().manual_seed(0)
    log_prior = torch.rand(4, generator=g, dtype=torch.float64).softmax(0).log()
    token_lp = -torch.rand(3, 4, 7, generator=g, dtype=torch.float64) * 3
    mask = torch.ones(3, 7)
    mask[1, :2] = 0
    post = BayesPosterior(log_prior, batch_size=3)
    for t in range(7):
        post.update(token_lp[:, :, t] * mask[:, t : t + 1].double())
    one_shot = bayes_log_posterior(log_prior, token_lp, mask)
    torch.testing.assert_close(post.log_posterior, one_shot, atol=1e-12, rtol=0)
    chunked = BayesPosterior(log_prior, batch_size=3)
    chunked.update_prefix(token_lp[:, :, :3], mask[:, :3])
    chunked.update_prefix(token_lp[:, :, 3:], mask[:, 3:])
    torch.testing.assert_close(chunked.log_posterior, one_shot, atol=1e-12, rtol=0)


def random_experts(batch=5, k=4, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(batch, k, vocab, generator=g, dtype=torch.float64).log_softmax(-1)
    lw = torch.randn(batch, k, generator=g, dtype=torch.float64).log_softmax(-1)
    return lp, lw


def test_top_k_with_all_experts_equals_mixture():
    lp, lw = random_experts()
    torch.testing.assert_close(mix_log_probs(lp, top_k_log_weights(lw, 4)), mix_log_probs(lp, lw), atol=1e-12, rtol=0)


def test_top_k_keeps_the_largest_and_renormalises():
    lp, lw = random_experts()
    top2 = top_k_log_weights(lw, 2)
    assert (torch.isfinite(top2).sum(-1) == 2).all()
    torch.testing.assert_close(top2.exp().sum(-1), torch.ones(5, dtype=torch.float64))
    assert torch.equal(torch.isfinite(top2), lw >= lw.topk(2, -1).values[:, -1:])
    with pytest.raises(DfmError):
        top_k_log_weights(lw, 5)


def test_excluding_an_expert_equals_the_mixture_of_the_rest():
    lp, lw = random_experts()
    rest = [0, 2, 3]
    expected = mix_log_probs(lp[:, rest], normalize_log_weights(lw[:, rest]))
    torch.testing.assert_close(mix_log_probs(lp, exclude_log_weights(lw, [1])), expected, atol=1e-12, rtol=0)
    with pytest.raises(DfmError, match="exclude fewer"):
        exclude_log_weights(lw, [0, 1, 2, 3])
    with pytest.raises(DfmError, match="numbered"):
        exclude_log_weights(lw, [7])


def test_mixture_stays_normalised_when_an_expert_gives_minus_inf():
    lp, lw = random_experts()
    lp[:, 0, 3] = float("-inf")
    lp = lp.log_softmax(-1)
    mixed = mix_log_probs(lp, lw)
    assert torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed.exp().sum(-1), torch.ones(5, dtype=torch.float64))
    lp[:, :, 3] = float("-inf")
    mixed = mix_log_probs(lp.log_softmax(-1), lw)
    torch.testing.assert_close(mixed.exp().sum(-1), torch.ones(5, dtype=torch.float64))
    assert (mixed[:, 3] == float("-inf")).all() and not mixed.isnan().any()


def test_dfm_loss_equals_shifted_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 13, generator=g)
    tokens = torch.randint(0, 13, (3, 9), generator=g)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 13), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(dfm_loss(logits, tokens), expected, atol=1e-6, rtol=0)


def test_dfm_loss_is_the_transition_likelihood_of_the_path():
    """Build X_t, the velocity and the kernel explicitly; the kernel's log-prob of X_{t+1} is the loss."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 5, (2, 6), generator=g)
    path = ARPath(length=6, vocab_size=5)
    # the posterior at position i is the model's next-token distribution after positions < i
    posteriors = torch.cat([torch.zeros(2, 1, 5, dtype=torch.float64), logits[:, :-1].softmax(-1)], 1)
    nll = []
    for t in range(1, 6):  # step t reveals position t given positions < t
        state = path.sample(tokens, t)
        current = state[:, t]
        assert (current == path.mask_id).all() and torch.equal(state[:, :t], tokens[:, :t])
        velocities = path.velocity(posteriors, state, t)
        assert not velocities[:, torch.arange(6) != t].any()  # one position moves per step
        u = velocities[:, t]
        check_velocity(u, current)
        kernel = path.transition(u)
        torch.testing.assert_close(kernel.sum(-1), torch.ones(2, dtype=torch.float64))
        assert torch.equal(path.sample(tokens, t + 1)[:, t], tokens[:, t])
        nll.append(-kernel.gather(-1, tokens[:, t : t + 1]).log())
    torch.testing.assert_close(torch.cat(nll, 1).mean(), dfm_loss(logits, tokens), atol=1e-12, rtol=0)


def test_check_velocity_rejects_invalid():
    path = ARPath(length=4, vocab_size=3)
    mask_state = torch.tensor([3])
    state = path.sample(torch.zeros(1, 4, dtype=torch.long), 0)
    check_velocity(path.velocity(torch.tensor([[0.2, 0.3, 0.5]]).expand(1, 4, 3), state, 0)[:, 0], mask_state)
    with pytest.raises(ValueError, match="sum to zero"):
        check_velocity(torch.tensor([[0.2, 0.3, 0.5, 0.0]]), mask_state)
    with pytest.raises(ValueError, match="non-negative"):
        check_velocity(torch.tensor([[-0.5, 1.0, 0.5, -1.0]]), mask_state)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        check_velocity(torch.tensor([[2.0, 0.0, 0.0, -2.0]]), mask_state)
    assert torch.equal(path.schedule(), torch.arange(4))


def test_switch_sampling_matches_the_mixture_distribution():
    """Hierarchical sampling (expert, then token) is exact in distribution; top-1 is not."""
    pool = MarkovPool(num_experts=3, vocab_size=4, seed=3)
    tokens, mask = one_row([2])
    weights = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64).log()
    target = mix_log_probs(pool.next_token_log_probs(tokens, mask, [0, 1, 2]), weights)[0].exp()
    n = 20_000

    def empirical(routing):
        g = torch.Generator().manual_seed(0)
        config = DecodeConfig(routing=routing, k=1)
        batch_tokens, batch_mask = tokens.expand(n, -1), mask.expand(n, -1)
        selection = select_experts(weights.expand(n, -1), routing, 1, g)
        out = decode_step(pool, batch_tokens, batch_mask, selection, config, g)
        return torch.bincount(out.token, minlength=4).double() / n

    # TV distance of an n-sample empirical law from the truth: E[TV] <= sum_y sqrt(p(1-p)/n)/2
    # ~ 0.006 here; 0.02 is > 3x that, while top-1 is off by the weight mass it drops.
    tv_switch = 0.5 * (empirical(Routing.SWITCH) - target).abs().sum().item()
    tv_top1 = 0.5 * (empirical(Routing.TOPK) - target).abs().sum().item()
    assert tv_switch < 0.02
    assert tv_top1 > 0.05


def test_select_experts_lists_only_the_experts_that_run():
    lw = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.2, 0.7]]).log()
    assert select_experts(lw, Routing.TOPK, 1).active == [0, 2]
    assert select_experts(lw[:1], Routing.TOPK, 1).active == [0]
    assert select_experts(lw, Routing.MIXTURE).active == [0, 1, 2]
    switched = select_experts(lw, Routing.SWITCH, generator=torch.Generator().manual_seed(0))
    assert (torch.isfinite(switched.log_weights).sum(-1) == 1).all()
    with pytest.raises(DfmError, match="unknown routing mode"):
        parse_routing("nope")


def test_sampling_filters():
    lp = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert sample_tokens(lp, temperature=0).item() == 0
    top2 = filter_log_probs(lp, top_k=2).exp()
    torch.testing.assert_close(top2, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    nucleus = filter_log_probs(lp, top_p=0.8).exp()  # 0.5 + 0.3 reaches 0.8: the rest is dropped
    torch.testing.assert_close(nucleus, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    hot = filter_log_probs(lp, temperature=2.0).exp()
    torch.testing.assert_close(hot, lp.div(2).softmax(-1))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    many = lp.expand(100, -1)
    assert torch.equal(sample_tokens(many, g1), sample_tokens(many, g2))


class UniformRouter:
    def __init__(self, k):
        self.k = k

    def __call__(self, tokens, mask):
        return torch.full((tokens.shape[0], self.k), -math.log(self.k), dtype=torch.float64)


def test_generate_bayes_tracks_the_exact_posterior():
    pool = MarkovPool(num_experts=3, vocab_size=4, seed=2)
    prior = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    tokens, mask = one_row([1, 3])
    config = DecodeConfig(routing=Routing.BAYES, max_new_tokens=4)
    out = generate(pool, tokens, mask, config, log_prior=prior.log(), generator=torch.Generator().manual_seed(0))
    seq = out.tokens[0, 1:].tolist()
    for i in range(4):  # weights of generated token i are the posterior after prompt + i tokens
        prefix = seq[: 2 + i]
        post = (prior.log() + pool.sequence_log_prob(prefix)).softmax(-1)
        torch.testing.assert_close(out.weights[0, i], post, atol=1e-12, rtol=0)


def test_generate_route_on_prompt_keeps_the_choice_and_eos_stops():
    pool = MarkovPool(num_experts=3, vocab_size=4, seed=2)
    tokens, mask = one_row([1])
    config = DecodeConfig(routing=Routing.SWITCH, max_new_tokens=6, route_on="prompt", eos_id=2, pad_id=0)
    out = generate(pool, tokens, mask, config, weigher=UniformRouter(3), generator=torch.Generator().manual_seed(4))
    assert len({tuple(r) for r in out.experts_ran}) == 1 and len(out.experts_ran[0]) == 1
    generated = out.new_tokens[0].tolist()
    if 2 in generated:
        stop = generated.index(2)
        assert out.lengths[0].item() == stop + 1 and out.new_tokens.shape[1] == stop + 1


def test_generate_same_seed_same_tokens_and_exclusion():
    pool = MarkovPool(num_experts=3, vocab_size=4, seed=2)
    tokens = torch.tensor([[9, 0, 1], [0, 2, 3]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    config = DecodeConfig(routing=Routing.SWITCH, max_new_tokens=8, exclude=[1])
    runs = [
        generate(pool, tokens, mask, config, weigher=UniformRouter(3), generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert all(1 not in step for step in runs[0].experts_ran)
    assert (runs[0].weights[:, :, 1] == 0).all()
    with pytest.raises(DfmError, match="k must be between"):
        generate(pool, tokens, mask, DecodeConfig(routing=Routing.TOPK, k=4), weigher=UniformRouter(3))
