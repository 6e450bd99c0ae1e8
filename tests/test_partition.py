import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import save_file

from dfm.errors import DfmError
from models.partition import Partition
from training.clustering import balanced_assign, fit_kmeans, from_labels, partition_stats

VOCAB = 200
TOPICS = 4


def topic_corpus(per_topic: list[int], seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """Documents from TOPICS topics: 80% of tokens from the topic's own 50 ids, 20% from all 200."""
    g = torch.Generator().manual_seed(seed)
    docs, labels = [], []
    for topic, count in enumerate(per_topic):
        dist = torch.full((VOCAB,), 0.2 / VOCAB)
        dist[topic * 50 : (topic + 1) * 50] += 0.8 / 50
        for _ in range(count):
            length = int(torch.randint(20, 61, (1,), generator=g))
            docs.append(torch.multinomial(dist, length, replacement=True, generator=g).tolist())
            labels.append(topic)
    order = torch.randperm(len(docs), generator=g).tolist()
    return [docs[i] for i in order], [labels[i] for i in order]


@pytest.fixture(scope="module")
def corpus():
    return topic_corpus([100] * TOPICS)


@pytest.fixture(scope="module")
def fitted(corpus):
    return fit_kmeans(corpus[0], TOPICS, VOCAB, seed=0)


def greedy_reference(sims: torch.Tensor, capacity: int) -> list[int]:
    """Walk (doc, cluster) pairs by (similarity desc, doc asc, cluster asc); take free doc + open cluster."""
    n, k = sims.shape
    pairs = sorted(((-float(sims[d, c]), d, c) for d in range(n) for c in range(k)))
    out, load = [-1] * n, [0] * k
    for _, d, c in pairs:
        if out[d] < 0 and load[c] < capacity:
            out[d], load[c] = c, load[c] + 1
    return out


def test_recovers_topics(corpus, fitted):
    docs, labels = corpus
    stats = partition_stats(fitted.assignments, labels)
    assert stats["purity"] >= 0.95
    assert stats["nmi"] >= 0.85
    assert sum(stats["sizes"]) == len(docs)
    assert fitted.centres.shape == (TOPICS, VOCAB) and fitted.projection is None
    torch.testing.assert_close(fitted.centres.norm(dim=1), torch.ones(TOPICS))


def test_recovers_topics_with_svd(corpus):
    docs, labels = corpus
    part = fit_kmeans(docs, TOPICS, VOCAB, svd_dim=16, seed=1)
    assert part.projection.shape == (VOCAB, 16) and part.centres.shape == (TOPICS, 16)
    assert part.features(docs[:5]).shape == (5, 16)
    assert partition_stats(part.assignments, labels)["purity"] >= 0.95


def test_deterministic(corpus):
    docs = corpus[0][:200]
    a = fit_kmeans(docs, 3, VOCAB, seed=7, svd_dim=8)
    b = fit_kmeans(docs, 3, VOCAB, seed=7, svd_dim=8)
    assert torch.equal(a.assignments, b.assignments)
    assert torch.equal(a.centres, b.centres)
    assert torch.equal(a.projection, b.projection)


@pytest.mark.parametrize("k,balance", [(4, 1.0), (4, 1.1), (3, 1.2), (7, 1.5)])
def test_balance_cap_holds_on_skewed_data(k, balance):
    docs, _ = topic_corpus([250, 50, 50, 50], seed=3)
    part = fit_kmeans(docs, k, VOCAB, balance=balance, seed=0, iterations=10, restarts=1)
    assert max(part.sizes) <= math.ceil(balance * len(docs) / k)
    assert sum(part.sizes) == len(docs) and len(part.sizes) == k


def test_balanced_assign_equals_greedy():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n, k = int(torch.randint(1, 30, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
        sims = torch.rand(n, k, generator=g)
        if trial % 2:  # coarse values force ties, broken by (doc, cluster) order
            sims = (sims * 3).round() / 3
        capacity = math.ceil(n / k) + trial % 3
        assert balanced_assign(sims, capacity).tolist() == greedy_reference(sims, capacity)


def test_one_cluster_and_empty_docs():
    docs = [[1, 2, 3], [], [4, 4, 5], []]
    part = fit_kmeans(docs, 1, 10)
    assert part.assignments.tolist() == [0, 0, 0, 0]
    feats = part.features(docs)
    assert sp.issparse(feats) and feats.getnnz(axis=1).tolist() == [3, 0, 2, 0]  # empty docs: empty rows
    torch.testing.assert_close(torch.from_numpy(feats.toarray()).norm(dim=1), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    # a zero vector is at distance 1 from every unit centre (up to float rounding of the norm)
    torch.testing.assert_close(part.sq_distances([[]]), torch.ones(1, 1))
    two = fit_kmeans(docs, 2, 10, balance=1.2)  # capacity ceil(1.2 * 4 / 2) = 3
    assert max(two.sizes) == 3 and two.assignments[0] != two.assignments[2]


def test_more_clusters_than_docs():
    with pytest.raises(DfmError, match=r"only 2 training documents for 3 clusters .* at most 1 or add documents"):
        fit_kmeans([[1], [2]], 3, 10)
    with pytest.raises(DfmError, match=r"only 5 training documents for 3 clusters"):  # 2 per cluster at the least
        fit_kmeans([[1], [2], [3], [4], [5]], 3, 10)
    assert fit_kmeans([[1], [2], [3], [4], [5], [6]], 3, 10).num_clusters == 3


def test_bad_inputs():
    with pytest.raises(DfmError, match="token ids"):
        fit_kmeans([[1], [12]], 1, 10)
    with pytest.raises(DfmError, match="balance"):
        fit_kmeans([[1], [2]], 2, 10, balance=0.9)


def test_log_weights_normalised_and_match_assign(corpus, fitted):
    queries = corpus[0][:50] + [doc[:3] for doc in corpus[0][50:60]]
    for temperature in (0.05, 1.0, 10.0):
        logw = fitted.log_weights(queries, temperature)
        torch.testing.assert_close(logw.logsumexp(dim=1), torch.zeros(len(queries)))
        assert torch.equal(logw.argmax(dim=1), fitted.assign(queries))
    # an empty prefix is equidistant from all (unit) centres: uniform weights
    torch.testing.assert_close(fitted.log_weights([[]], 1.0), torch.full((1, TOPICS), -math.log(TOPICS)))
    # unconstrained assignment of the training docs agrees with their balanced cluster here
    assert torch.equal(fitted.assign(corpus[0]), fitted.assignments)
    with pytest.raises(DfmError, match="temperature"):
        fitted.log_weights(queries, 0.0)


def test_sq_distances_match_features(fitted, corpus):
    docs = corpus[0][:20]
    expected = torch.cdist(torch.from_numpy(fitted.features(docs).toarray()), fitted.centres).square()
    torch.testing.assert_close(fitted.sq_distances(docs), expected, atol=1e-5, rtol=0)
    from_tensors = fitted.features([torch.tensor(d) for d in docs])
    assert np.array_equal(from_tensors.toarray(), fitted.features(docs).toarray())


def test_tfidf_is_smooth_idf_sublinear_tf_l2():
    # N = 3 documents over V = 5 ids: df = [0, 2, 1, 1, 0]; idf = ln((1 + N) / (1 + df)) + 1;
    # tf = 1 + ln(count); each row divided by its L2 norm; the empty document stays a zero row
    docs = [[1, 1, 1, 2], [3, 1], []]
    part = from_labels(docs, [0, 1, 0], 5)
    df = torch.tensor([0.0, 2.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    idf = torch.log(4 / (1 + df)) + 1
    torch.testing.assert_close(part.idf, idf.float(), rtol=1.2e-7, atol=0)  # one float32 rounding
    rows = torch.zeros(3, 5, dtype=torch.float64)
    rows[0, 1], rows[0, 2] = (1 + math.log(3)) * idf[1], idf[2]
    rows[1, 3], rows[1, 1] = idf[3], idf[1]
    expected = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-300)
    features = part.features(docs)
    assert sp.issparse(features) and features.dtype == np.float32 and features.nnz == 4
    torch.testing.assert_close(torch.from_numpy(features.toarray()).double(), expected, rtol=0, atol=3e-7)


def test_features_stay_sparse_and_projections_dense(corpus, fitted):
    docs = corpus[0][:7]
    features = fitted.features(docs)
    assert sp.issparse(features) and features.shape == (7, VOCAB)
    assert features.getnnz(axis=1).tolist() == [len(set(d)) for d in docs]  # one entry per distinct id
    projected = fit_kmeans(corpus[0], TOPICS, VOCAB, svd_dim=8, seed=0, restarts=1).features(docs)
    assert isinstance(projected, np.ndarray) and projected.shape == (7, 8) and projected.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(projected, axis=1), np.ones(7), rtol=1e-6)


# A partition at a 1M-token vocabulary assigns and weighs 100 documents of 200 tokens; a dense
# (documents, vocabulary) float32 feature matrix would be 400 MB, the sparse one is a few hundred KB.
# The peak is VmHWM, the process's own (ru_maxrss carries the forking pytest's peak over exec).
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_assign_and_log_weights_never_densify():
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(root / "tests" / "peak_growth_child.py")],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    growth_mb = int(done.stdout.split()[-1]) / 1024
    assert growth_mb < 100, f"assigning 100 documents raised peak RSS by {growth_mb:.0f} MB"


def test_centre_is_the_normalised_sum_of_features(fitted, corpus):
    docs = corpus[0][:30]
    total = torch.from_numpy(fitted.features(docs).toarray()).sum(0)
    torch.testing.assert_close(fitted.centre(docs), total / total.norm(), atol=1e-6, rtol=0)
    assert torch.equal(fitted.centre([[], []]), torch.zeros(VOCAB))


def test_empty_batch(fitted):
    assert fitted.assign([]).shape == (0,)
    assert fitted.log_weights([], 1.0).shape == (0, TOPICS)


def test_loads_a_version_1_partition_and_applies_its_idf(tmp_path):
    """The on-disk format as `dfm prepare` has written it since version 1, written here by hand."""
    centres = torch.zeros(2, 6)
    centres[0, :2] = centres[1, 3:5] = 2**-0.5
    save_file(
        {"centres": centres, "idf": torch.ones(6), "assignments": torch.tensor([0, 1, 1])},
        str(tmp_path / "centres.safetensors"),
    )
    meta = {
        "format": "dfm-partition",
        "version": 1,
        "num_clusters": 2,
        "dim": 6,
        "vocab_size": 6,
        "num_documents": 3,
        "projection": False,
        "label_values": ["a", "b"],
        "sizes": [1, 2],
    }
    (tmp_path / "partition.json").write_text(json.dumps(meta))
    part = Partition.load(tmp_path)
    assert part.assign([[0, 1], [4, 3, 3], [5]]).tolist() == [0, 1, 0]  # [5] is equally far: lowest id
    # [0, 1] is the unit vector of centre 0: distance 0 to it and 2 to the orthogonal centre 1
    torch.testing.assert_close(part.sq_distances([[0, 1]]), torch.tensor([[0.0, 2.0]]), atol=1e-6, rtol=0)


def test_from_labels(corpus):
    docs, labels = corpus
    names = ["sport", "art", "code", "law"]
    part = from_labels(docs, [names[y] for y in labels], VOCAB)
    assert part.label_values == sorted(names)
    assert [part.label_values[c] for c in part.assignments.tolist()] == [names[y] for y in labels]
    assert part.centres.shape == (TOPICS, VOCAB)
    # centroid routing over label centres recovers the labels of the documents themselves
    agree = (part.assign(docs) == part.assignments).float().mean()
    assert agree >= 0.95


def test_from_labels_int_remap_and_errors():
    for labels in ([7, 3, 7], torch.tensor([7, 3, 7])):
        part = from_labels([[1], [2], [3]], labels, 5)
        assert part.label_values == [3, 7] and part.assignments.tolist() == [1, 0, 1]
    with pytest.raises(DfmError, match="one label per document"):
        from_labels([[1]], [0, 1], 5)
    with pytest.raises(DfmError, match="mix"):
        from_labels([[1], [2]], [0, "a"], 5)


@pytest.mark.parametrize("with_svd", [False, True])
def test_save_load_round_trip(tmp_path, corpus, with_svd):
    part = fit_kmeans(corpus[0][:100], 3, VOCAB, svd_dim=8 if with_svd else None, iterations=5, restarts=1)
    part.save(tmp_path / "partition")
    back = Partition.load(tmp_path / "partition")
    assert torch.equal(back.centres, part.centres)
    assert torch.equal(back.idf, part.idf)
    assert torch.equal(back.assignments, part.assignments)
    assert (back.projection is None) == (not with_svd)
    if with_svd:
        assert torch.equal(back.projection, part.projection)
    assert back.label_values is None


def test_save_load_labels_and_overwrite(tmp_path):
    path = tmp_path / "p"
    from_labels([[1], [2]], [0, 1], 5).save(path)
    from_labels([[1], [2], [3]], ["x", "y", "x"], 5).save(path)
    back = Partition.load(path)
    assert back.label_values == ["x", "y"] and back.assignments.tolist() == [0, 1, 0]


def test_load_errors(tmp_path):
    with pytest.raises(DfmError, match="no partition"):
        Partition.load(tmp_path / "missing")
    path = tmp_path / "p"
    from_labels([[1], [2]], [0, 1], 5).save(path)
    (path / "centres.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DfmError, match="unreadable"):
        Partition.load(path)
    from_labels([[1], [2]], [0, 1], 5).save(path)
    (path / "partition.json").write_text('{"format": "dfm-partition", "version": 1, "num_clusters": 3}')
    with pytest.raises(DfmError, match="corrupt"):
        Partition.load(path)


def test_stats_hand_computed():
    perfect = partition_stats(torch.tensor([0, 0, 1, 1]), [5, 5, 9, 9])
    assert perfect == {"sizes": [2, 2], "purity": 1.0, "nmi": pytest.approx(1.0, abs=1e-12)}
    independent = partition_stats(torch.tensor([0, 0, 1, 1]), ["a", "b", "a", "b"])
    assert independent["purity"] == 0.5 and independent["nmi"] == pytest.approx(0.0, abs=1e-12)
    # clusters {0,0,1} and {1,1,1}: MI = 1/6 ln 2 + 1/2 ln 3/2, H(clusters) = ln 2, H(labels) = ln 3 - 2/3 ln 2
    stats = partition_stats(torch.tensor([0, 0, 0, 1, 1, 1]), [0, 0, 1, 1, 1, 1])
    mutual = math.log(2) / 6 + math.log(1.5) / 2
    expected = mutual / ((math.log(2) + math.log(3) - 2 / 3 * math.log(2)) / 2)
    assert stats["purity"] == pytest.approx(5 / 6, abs=1e-15)
    assert stats["nmi"] == pytest.approx(expected, abs=1e-12)
    # a single cluster against a single class is perfect agreement; against two classes no information
    assert partition_stats(torch.zeros(3, dtype=torch.long), [1, 1, 1])["nmi"] == 1.0
    assert partition_stats(torch.zeros(4, dtype=torch.long), [0, 1, 0, 1])["nmi"] == 0.0
    no_labels = partition_stats(torch.tensor([0, 2]), None, num_clusters=4)
    assert no_labels == {"sizes": [1, 0, 1, 0], "purity": None, "nmi": None}
