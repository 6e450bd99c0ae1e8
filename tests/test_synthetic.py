import itertools
import math
from collections import Counter

import pytest
import torch

from dfm.errors import DfmError
from training.synthetic import SyntheticCorpus, SyntheticSpec

# Tiny corpus: 6 words (2 common + 2 topical per domain), every document can be enumerated.
TINY = SyntheticSpec(
    num_domains=2,
    num_documents=10,
    seed=3,
    vocab_size=6,
    common_words=2,
    min_successors=1,
    max_successors=2,
    min_length=2,
    mean_length=3.0,
)


@pytest.fixture(scope="module")
def default_corpus() -> SyntheticCorpus:
    return SyntheticCorpus(SyntheticSpec())


def all_texts(corpus: SyntheticCorpus, length: int) -> list[str]:
    return [" ".join(ws) for ws in itertools.product(corpus.words, repeat=length)]


def test_same_spec_same_dataset_and_different_seed_differs():
    spec = SyntheticSpec(num_documents=50, seed=7)
    a = SyntheticCorpus(spec).to_dataset()
    b = SyntheticCorpus(SyntheticSpec.from_dict(spec.to_dict())).to_dataset()
    assert a["text"] == b["text"] and a["domain"] == b["domain"]
    c = SyntheticCorpus(SyntheticSpec(num_documents=50, seed=8)).to_dataset()
    assert a["text"] != c["text"]


def test_vocabulary_is_distinct_nonempty_lowercase_words(default_corpus):
    words = default_corpus.words
    assert len(words) == len(set(words)) == 200
    assert all(w.isalpha() and w.islower() for w in words)


def test_complete_documents_of_each_length_have_exactly_the_stop_process_mass():
    corpus = SyntheticCorpus(TINY)
    s, m = corpus.stop_probability, TINY.min_length
    assert s == 0.5
    for length in range(1, 6):
        lls = torch.stack([corpus.domain_log_likelihoods(t) for t in all_texts(corpus, length)])
        mass = lls.exp().sum(dim=0)  # (K,)
        expected = 0.0 if length < m else s * (1 - s) ** (length - m)
        assert torch.allclose(mass, torch.full_like(mass, expected), rtol=0, atol=1e-12)


def test_prefix_probabilities_sum_to_probability_of_reaching_that_length():
    corpus = SyntheticCorpus(TINY)
    s, m = corpus.stop_probability, TINY.min_length
    for length in range(1, 5):
        texts = all_texts(corpus, length)
        lls = torch.stack([corpus.domain_log_likelihoods(t, complete=False) for t in texts])
        expected = (1 - s) ** max(0, length - m)
        assert torch.allclose(lls.exp().sum(dim=0), torch.full((2,), expected, dtype=torch.float64), rtol=0, atol=1e-12)
        mixture = math.fsum(math.exp(corpus.log_prob(t, complete=False)) for t in texts)
        assert mixture == pytest.approx(expected, abs=1e-12)


def test_empirical_frequencies_match_exact_probabilities():
    spec = SyntheticSpec(
        num_domains=2,
        seed=5,
        vocab_size=6,
        common_words=2,
        min_successors=1,
        max_successors=2,
        min_length=1,
        mean_length=1.5,
        priors=(0.3, 0.7),
    )
    corpus = SyntheticCorpus(spec)
    n = 20_000
    docs = corpus.sample(n, seed=11)
    counts = Counter(t for t, _ in docs)
    # The 3 most probable documents, chosen by exact probability (no selection bias from the
    # sample). Each count is Binomial(n, p): 5 standard deviations bound a correct sampler's
    # deviation except with probability < 1e-6 per check.
    candidates = all_texts(corpus, 1) + all_texts(corpus, 2)
    probs = {t: math.exp(corpus.log_prob(t)) for t in candidates}
    for text in sorted(probs, key=probs.get, reverse=True)[:3]:
        p = probs[text]
        assert abs(counts[text] / n - p) <= 5 * math.sqrt(p * (1 - p) / n)
    share = sum(k for _, k in docs) / n
    assert abs(share - 0.7) <= 5 * math.sqrt(0.7 * 0.3 / n)


def test_entropy_floor_is_positive_and_finite(default_corpus):
    texts = [t for t, _ in default_corpus.sample(300, seed=1)]
    bpb = default_corpus.entropy_floor_bpb(texts)
    assert 0 < bpb < 8 and math.isfinite(bpb)
    nats = sum(-default_corpus.log_prob(t) for t in texts)
    assert bpb == pytest.approx(nats / math.log(2) / sum(len(t.encode()) for t in texts), rel=1e-12)


def test_posterior_concentrates_on_the_true_domain_for_long_documents(default_corpus):
    docs = [(t, k) for t, k in default_corpus.sample(400, seed=2) if len(t.split(" ")) >= 30]
    assert len(docs) >= 150
    hits = sum(int(default_corpus.posterior(t).argmax()) == k for t, k in docs)
    assert hits / len(docs) >= 0.95


def test_posterior_is_bayes_over_domain_likelihoods(default_corpus):
    text, _ = default_corpus.sample(1, seed=4)[0]
    assert torch.equal(default_corpus.posterior(""), default_corpus.priors)
    joint = default_corpus.priors.log() + default_corpus.domain_log_likelihoods(text)
    assert torch.allclose(default_corpus.posterior(text), torch.softmax(joint, 0), atol=1e-12)
    assert default_corpus.log_prob(text) == pytest.approx(torch.logsumexp(joint, 0).item(), abs=1e-9)


def test_impossible_text_has_minus_inf_and_unknown_word_raises():
    corpus = SyntheticCorpus(TINY)
    short = corpus.words[0]  # one word, below min_length=2
    assert corpus.log_prob(short) == -math.inf
    assert corpus.log_prob(short, complete=False) > -math.inf
    impossible = [t for t in all_texts(corpus, 2) if corpus.log_prob(t) == -math.inf]
    assert impossible  # sparse transitions: most word pairs cannot occur
    with pytest.raises(DfmError, match="not in the synthetic vocabulary"):
        corpus.log_prob(f"{corpus.words[0]} qqqq")
    with pytest.raises(DfmError):
        corpus.log_prob(f"{corpus.words[0]}  {corpus.words[1]}")  # double space


def test_to_dataset_columns_and_rows():
    spec = SyntheticSpec(num_documents=37, seed=1)
    ds = SyntheticCorpus(spec).to_dataset()
    assert ds.column_names == ["text", "domain"]
    assert len(ds) == 37
    assert set(ds["domain"]) <= set(range(spec.num_domains))
    assert all(len(t.split(" ")) >= spec.min_length for t in ds["text"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_domains": 0}, "num_domains"),
        ({"num_documents": 0}, "num_documents"),
        ({"priors": (0.5, 0.5)}, "priors"),
        ({"vocab_size": 50}, "vocab_size"),
        ({"mean_length": 2.0}, "mean_length"),
    ],
)
def test_invalid_spec_raises(kwargs, message):
    with pytest.raises(DfmError, match=message):
        SyntheticSpec(**kwargs)


def test_spec_dict_round_trip_and_unknown_key():
    spec = SyntheticSpec(num_domains=2, priors=(1.0, 3.0))
    assert SyntheticSpec.from_dict(spec.to_dict()) == spec
    assert SyntheticCorpus(spec).priors.tolist() == [0.25, 0.75]
    with pytest.raises(DfmError, match="unknown synthetic spec keys"):
        SyntheticSpec.from_dict({"num_domain": 2})
