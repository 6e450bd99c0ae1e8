"""The router generalizes: distilled from the exact posterior of known sources on enough documents,
it reaches a held-out KL that a router trained on too few documents does not; the fitted
temperature never does worse on the documents it was fitted on.

The sources are K unigram distributions over the tokens (a domain's vocabulary, which is most of
what tells real domains apart) with unbalanced priors, and documents of mixed lengths (short ones
of a few tokens, long ones near the router's context), so the exact Bayes posterior of every
prefix is known without training any expert.
"""

import math

import pytest
import torch

from dfm.posterior import prefix_log_posteriors
from models.router import Router, RouterConfig
from training.router_calibration import fit_temperature, posterior_kl
from training.router_training import router_examples, router_loss
from training.trainer import TrainConfig, train

VOCAB, K, CONTEXT, BOS = 20, 3, 48, 0
PRIORS = torch.tensor([0.6, 0.25, 0.15], dtype=torch.float64)


def _chains() -> torch.Tensor:
    """(K, V, V) log transition matrices over tokens 1..V-1 (row: previous token, BOS included),
    each cluster's rows all alike: a unigram source."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(K, 1, VOCAB, generator=g, dtype=torch.float64) * 1.5
    logits[:, :, BOS] = -math.inf  # BOS is never emitted
    return torch.log_softmax(logits, -1).expand(K, VOCAB, VOCAB)


def _documents(count: int, seed: int, chains: torch.Tensor) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Documents and their exact per-prefix posteriors (n + 1, K)."""
    g = torch.Generator().manual_seed(seed)
    docs, targets = [], []
    for _ in range(count):
        k = int(torch.multinomial(PRIORS, 1, generator=g))
        short = torch.rand(1, generator=g).item() < 0.5
        n = (
            int(torch.randint(2, 8, (1,), generator=g))
            if short
            else int(torch.randint(30, CONTEXT - 1, (1,), generator=g))
        )
        ids, prev = [], BOS
        for _ in range(n):
            prev = int(torch.multinomial(chains[k, prev].exp(), 1, generator=g))
            ids.append(prev)
        inputs = torch.tensor([BOS, *ids[:-1]])
        token_lp = chains[:, inputs, torch.tensor(ids)]  # (K, n)
        token_lp = torch.cat([token_lp, torch.zeros(K, 1, dtype=torch.float64)], 1)  # row n: all n tokens seen
        docs.append(ids)
        targets.append(prefix_log_posteriors(token_lp, PRIORS.log()).exp().float())
    return docs, targets


def _trained_router(tmp_path, name: str, docs, targets) -> Router:
    torch.manual_seed(0)
    router = Router(
        RouterConfig(vocab_size=VOCAB, num_experts=K, hidden_size=32, num_layers=1, num_heads=2, max_positions=CONTEXT)
    )
    examples = router_examples(docs, targets, CONTEXT, BOS)
    options = TrainConfig(steps=150, batch_size=32, lr=3e-3, warmup_steps=10, checkpoint_every=0, log_every=0)
    train(
        router,
        examples,
        router_loss,
        options,
        save_fn=lambda m, d: m.save_pretrained(d),
        out_dir=tmp_path / name,
        checkpoint_dir=tmp_path / f"ckpt-{name}",
        log_path=tmp_path / f"{name}.jsonl",
        desc=name,
    )
    return router


@pytest.fixture(scope="module")
def held_out():
    chains = _chains()
    docs, targets = _documents(300, seed=1, chains=chains)
    return chains, router_examples(docs, targets, CONTEXT, BOS)


#: held-out KL(posterior || router) in nats: a router distilled on 3000 documents measures 0.016,
#: the one trained on 30 documents for as many steps 0.087 (it learns their tokens, not the sources')
KL_BOUND = 0.04


def test_router_on_enough_documents_generalizes_and_too_few_does_not(tmp_path, held_out) -> None:
    chains, examples = held_out
    many = _trained_router(tmp_path, "many", *_documents(3000, seed=2, chains=chains))
    few = _trained_router(tmp_path, "few", *_documents(30, seed=2, chains=chains))
    good, bad = posterior_kl(many, examples), posterior_kl(few, examples)
    assert good <= KL_BOUND < bad, (good, bad)


def test_fitted_temperature_recovers_a_known_one(tmp_path, held_out) -> None:
    """Targets softmax(logits / 3) of the router's own logits: the soft cross-entropy is minimal
    exactly where softmax(logits / T) equals them, at T = 3."""
    _, examples = held_out
    torch.manual_seed(0)
    router = Router(
        RouterConfig(vocab_size=VOCAB, num_experts=K, hidden_size=32, num_layers=1, num_heads=2, max_positions=CONTEXT)
    )
    torch.nn.init.normal_(router.head.weight, std=2.0)  # confident logits, far from uniform
    docs = [row[1:length] for row, length in zip(examples["input_ids"], examples["length"])]
    with torch.no_grad():
        targets = [torch.softmax(router(torch.tensor([[BOS, *ids]]))[0] / 3, -1) for ids in docs]
    temperature = fit_temperature(router, router_examples(docs, targets, CONTEXT, BOS))
    assert temperature == pytest.approx(3.0, rel=1e-3)
