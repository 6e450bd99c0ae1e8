"""Evaluation: exact per-document NLL, routing modes, bootstrap equivalence, router quality."""

import copy
import math

import pytest
import torch

from dfm.errors import DfmError
from dfm.posterior import bayes_log_posterior
from eval.equivalence import equivalence
from eval.perplexity import doc_bits, entropy_floor_bpb, mixed_token_log_probs, summarize, synthetic_corpus
from eval.router_quality import (
    accuracy_by_prefix_length,
    expected_calibration_error,
    inference_accounting,
    mean_kl,
    router_quality,
)
from models.expert import build_expert, expert_config
from models.router import Router, RouterConfig
from models.scoring import expert_token_log_probs, router_log_weights, token_log_probs, windows
from models.weighers import BayesWeigher, CentroidWeigher, OracleWeigher, Scoring, mode_log_weights
from training.clustering import from_labels

VOCAB = 40
BOS = 0
TINY = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}


def tiny_expert(seed):
    config = expert_config(VOCAB, bos_token_id=BOS, eos_token_id=BOS, tokenizer_fingerprint="test", arch=TINY)
    return build_expert(config, seed=seed).eval()


def tiny_router(k):
    torch.manual_seed(100 + k)
    return Router(
        RouterConfig(vocab_size=VOCAB, num_experts=k, hidden_size=16, num_layers=1, num_heads=2, max_positions=64)
    ).eval()


def random_docs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def expert():
    return tiny_expert(0)


def brute_force_log_prob(model, sequence, p, context, stride):
    """log p(sequence[p + 1]) with the context of the window that scores input position p."""
    i = 0 if p < context else math.ceil((p - context + 1) / stride)
    prefix = torch.tensor([sequence[i * stride : p + 1]])
    with torch.no_grad():
        return torch.log_softmax(model(prefix).logits[0, -1].double(), -1)[sequence[p + 1]]


# --- perplexity -----------------------------------------------------------------------------
def test_nll_equals_hf_loss_and_is_independent_of_batch_size(expert):
    docs = random_docs([0, 3, 7, 20, 30])  # [BOS] + ids + [EOS] fits a context of 32
    lps = token_log_probs(expert, docs, bos_id=BOS, context=32, batch_size=2)
    for ids, lp in zip(docs, lps):
        assert lp.shape == (len(ids) + 1,)
        block = torch.tensor([[BOS, *ids, BOS]])
        with torch.no_grad():
            loss = expert(block, labels=block).loss
        assert abs(-lp.mean().item() - loss.item()) < 1e-5
    long_doc = random_docs([50], seed=1)[0]  # truncated to the context: its first 15 predictions
    lp = token_log_probs(expert, [long_doc], bos_id=BOS, context=16)[0]
    block = torch.tensor([[BOS, *long_doc, BOS][:16]])
    with torch.no_grad():
        loss = expert(block, labels=block).loss
    assert abs(-lp[:15].mean().item() - loss.item()) < 1e-5
    for batch_size in (1, 3, 16):
        other = token_log_probs(expert, docs, bos_id=BOS, context=32, batch_size=batch_size)
        for a, b in zip(lps, other):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_stride_equal_to_context_scores_independent_blocks(expert):
    doc = random_docs([45], seed=2)[0]
    sequence = [BOS, *doc, BOS]
    context = 16
    lp = token_log_probs(expert, [doc], bos_id=BOS, context=context, stride=context)[0]
    inputs = sequence[:-1]
    blocks = []
    for start in range(0, len(inputs), context):
        block = torch.tensor([inputs[start : start + context]])
        with torch.no_grad():
            log_probs = torch.log_softmax(expert(block).logits[0].double(), -1)
        targets = torch.tensor(sequence[start + 1 : start + 1 + block.shape[1]])
        blocks.append(log_probs.gather(-1, targets[:, None]).squeeze(-1))
    torch.testing.assert_close(lp, torch.cat(blocks), atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_inputs,context,stride", [(1, 4, 4), (10, 4, 2), (37, 8, 3), (37, 8, 1), (8, 8, 5)])
def test_windows_score_every_position_once(num_inputs, context, stride):
    spans = windows(num_inputs, context, stride)
    scored = [p for start, end, first in spans for p in range(first, end)]
    assert scored == list(range(num_inputs))
    for i, (start, end, first) in enumerate(spans):
        assert start == i * stride and end - start <= context and start <= first < end


def test_sliding_window_matches_brute_force(expert):
    docs = random_docs([25, 5, 40], seed=3)
    context, stride = 12, 5
    lps = token_log_probs(expert, docs, bos_id=BOS, context=context, stride=stride, batch_size=4)
    for ids, lp in zip(docs, lps):
        sequence = [BOS, *ids, BOS]
        assert lp.shape == (len(ids) + 1,)
        expected = torch.stack(
            [brute_force_log_prob(expert, sequence, p, context, stride) for p in range(len(ids) + 1)]
        )
        torch.testing.assert_close(lp, expected, atol=1e-5, rtol=0)


def test_bad_stride_is_a_user_error(expert):
    with pytest.raises(DfmError, match="stride"):
        token_log_probs(expert, [[1, 2]], bos_id=BOS, context=8, stride=9)


def test_router_weights_match_a_full_forward():
    router = tiny_router(3)
    docs = random_docs([6, 20], seed=4)
    weights = router_log_weights(router, docs, bos_id=BOS, context=32, batch_size=2)
    for ids, lw in zip(docs, weights):
        with torch.no_grad():
            full = torch.log_softmax(router(torch.tensor([[BOS, *ids]])).double(), -1)[0]
        assert lw.shape == (len(ids) + 1, 3)
        torch.testing.assert_close(lw, full, atol=1e-6, rtol=0)


def test_every_mode_of_identical_experts_equals_the_expert(expert):
    k = 3
    docs = random_docs([4, 17, 30], seed=5)
    clusters = [2, 0, 1]
    experts = [copy.deepcopy(expert) for _ in range(k)]
    options = dict(bos_id=BOS, context=16, stride=8, batch_size=3)
    single = token_log_probs(expert, docs, **options)
    per_expert = expert_token_log_probs(experts, docs, **options)
    router = router_log_weights(tiny_router(k), docs, **options)
    partition = from_labels(random_docs([10] * 6, seed=6), [0, 1, 2, 0, 1, 2], VOCAB)
    log_prior = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).log()
    scoring = Scoring(BOS, 16, 8, 3)
    modes = {
        "mixture": router,
        "top1": [mode_log_weights("top1", w) for w in router],
        "top2": [mode_log_weights("top2", w) for w in router],
        "bayes": BayesWeigher(log_prior).documents(docs, per_expert, scoring),
        "centroid": CentroidWeigher(partition, temperature=0.1).documents(docs, per_expert, scoring),
        "oracle": OracleWeigher(clusters, k).documents(docs, per_expert, scoring),
    }
    for name, weights in modes.items():
        mixed = mixed_token_log_probs(per_expert, weights)
        for a, b in zip(mixed, single):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)


def test_bayes_mode_equals_brute_force_posterior():
    experts = [tiny_expert(1), tiny_expert(2)]
    docs = random_docs([9, 14], seed=7)
    log_prior = torch.tensor([0.7, 0.3], dtype=torch.float64).log()
    per_expert = expert_token_log_probs(experts, docs, bos_id=BOS, context=32)
    mixed = mixed_token_log_probs(per_expert, BayesWeigher(log_prior).documents(docs, per_expert, Scoring(BOS, 32)))
    for lp, got in zip(per_expert, mixed):
        expected = []
        for t in range(lp.shape[1]):
            posterior = bayes_log_posterior(log_prior, lp[None, :, :t])[0]
            expected.append(torch.logsumexp(posterior + lp[:, t], 0))
        torch.testing.assert_close(got, torch.stack(expected), atol=1e-10, rtol=0)
        # the chain rule telescopes: total = log sum_k pi_k q_k(document)
        torch.testing.assert_close(got.sum(), torch.logsumexp(log_prior + lp.sum(1), 0), atol=1e-10, rtol=0)


def test_summarize_and_bits():
    nll = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]
    out = summarize(nll, [2, 4])
    assert out["tokens"] == 3 and out["documents"] == 2
    assert out["nll"] == pytest.approx(2.0) and out["ppl"] == pytest.approx(math.exp(2.0))
    assert out["bpb"] == pytest.approx(6.0 / math.log(2.0) / 6.0)
    torch.testing.assert_close(doc_bits(nll), torch.tensor([3.0, 3.0], dtype=torch.float64) / math.log(2.0))
    with pytest.raises(DfmError, match="negative log-likelihoods"):
        summarize([-t for t in nll], [2, 4])


def test_entropy_floor_is_the_synthetic_corpus_floor():
    from training.run_config import DataOptions, RunConfig

    config = RunConfig(
        synthetic={"num_domains": 2, "num_documents": 5, "seed": 0, "vocab_size": 60, "common_words": 20}
    )
    corpus = synthetic_corpus(config)
    texts = [text for text, _ in corpus.sample(5, seed=1)]
    assert entropy_floor_bpb(corpus, texts) == corpus.entropy_floor_bpb(texts)
    assert synthetic_corpus(RunConfig(data=DataOptions(dataset="json"))) is None


# --- equivalence ----------------------------------------------------------------------------
def paired_bits(shift_bits, noise_bits, n=200):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(n, generator=g, dtype=torch.float64)
    noise = (noise - noise.mean()) * noise_bits
    base = torch.full((n,), 100.0, dtype=torch.float64)  # 100 bytes per document: baseline bpb 1.0
    return base + shift_bits + noise, base, torch.full((n,), 100)


@pytest.mark.parametrize(
    "shift,noise,expected",
    [(0.0, 0.5, "equivalent"), (-5.0, 0.5, "better"), (5.0, 0.5, "worse"), (0.0, 50.0, "inconclusive")],
)
def test_bootstrap_verdicts(shift, noise, expected):
    model, base, num_bytes = paired_bits(shift, noise)
    out = equivalence(model, base, num_bytes)
    assert out["verdict"] == expected
    assert out["margin"] == pytest.approx(0.02)
    assert out["delta_bpb"] == pytest.approx(shift / 100.0)
    lo, hi = out["ci95"]
    assert lo <= out["delta_bpb"] <= hi
    assert equivalence(model, base, num_bytes) == out  # deterministic by seed
    assert equivalence(model, base, num_bytes, seed=1)["ci95"] != out["ci95"]


def test_delta_is_the_difference_of_corpus_bpb():
    # one long document dominates: the corpus-level delta weights documents by their bytes
    model, base, num_bytes = [110.0, 1.0], [100.0, 2.0], [100, 1]
    out = equivalence(model, base, num_bytes, resamples=50)
    assert out["delta_bpb"] == pytest.approx((111.0 - 102.0) / 101.0)
    with pytest.raises(DfmError, match="same documents"):
        equivalence([1.0], [1.0, 2.0], [1, 1])


# --- router quality -------------------------------------------------------------------------
def confident(clusters_per_position, k=3):
    lw = torch.full((len(clusters_per_position), k), -math.inf, dtype=torch.float64)
    lw[torch.arange(len(clusters_per_position)), torch.tensor(clusters_per_position)] = 0.0
    return lw


def test_perfect_router():
    clusters = [0, 2, 1]
    weights = [confident([c] * n) for c, n in zip(clusters, [3, 9, 5])]  # documents of 2, 8 and 4 tokens
    out = router_quality(weights, weights, clusters)
    assert out["accuracy_by_length"] == {"lengths": [1, 2, 4, 8], "accuracy": [1.0] * 4, "counts": [3, 3, 2, 1]}
    assert out["ece"] == 0.0 and out["kl_bayes_router"] == 0.0


def test_router_quality_on_hand_made_weights():
    # one document of 4 tokens (5 positions); right from prefix length 2 on
    lw = torch.tensor([[0.5, 0.5], [0.6, 0.4], [0.2, 0.8], [0.1, 0.9], [0.1, 0.9]], dtype=torch.float64).log()
    acc = accuracy_by_prefix_length([lw], [1], max_length=2)
    assert acc == {"lengths": [1, 2], "accuracy": [0.0, 1.0], "counts": [1, 1]}
    # bins (0, 0.5] and (0.5, 1]: {0.5 (tie -> cluster 0, wrong)} and {0.6 wrong; 0.8, 0.9, 0.9 right}
    ece = expected_calibration_error([lw], [1], bins=2)
    assert ece == pytest.approx(1 / 5 * abs(0.0 - 0.5) + 4 / 5 * abs(3 / 4 - (0.6 + 0.8 + 0.9 + 0.9) / 4))
    uniform = torch.full((5, 2), math.log(0.5), dtype=torch.float64)
    p = lw.exp()
    assert mean_kl([lw], [uniform]) == pytest.approx(float((p * (p.log() - math.log(0.5))).sum(-1).mean()))


def test_inference_accounting():
    out = inference_accounting(expert_params=[10, 10, 10], router_params=2, baseline_params=10)
    assert set(out) == {"inference_flops_per_token", "parameters"}  # training FLOPs: compute matching's alone
    assert out["parameters"] == {"experts": 30, "router": 2, "baseline": 10}
    per_token = out["inference_flops_per_token"]
    assert per_token["mixture"] == 2 * 30 + 4 and per_token["bayes"] == 60 and per_token["top1"] == 24
    assert per_token["top2"] == 44 and per_token["switch"] == 24 and per_token["oracle"] == 20
    assert per_token["baseline"] == 20


def test_stacked_scoring_equals_experts_scored_one_by_one():
    experts = [tiny_expert(s) for s in (3, 4, 5)]
    docs = random_docs([3, 21, 40], seed=9)
    options = dict(bos_id=BOS, context=16, stride=8, batch_size=2)
    stacked = expert_token_log_probs(experts, docs, **options)
    for k, expert in enumerate(experts):
        for together, alone in zip(stacked, token_log_probs(expert, docs, **options)):
            torch.testing.assert_close(together[k], alone, atol=1e-5, rtol=0)
