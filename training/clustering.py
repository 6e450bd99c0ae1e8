"""Corpus partitioning, c-BTM style: tf-idf features and balanced spherical k-means, fitted into
a ``models.partition.Partition``; and the partition's statistics against reference labels.

scikit-learn does the parts it has: tf-idf (in ``models.partition``), k-means++ seeding, the
truncated SVD, NMI and the contingency table behind purity. The Lloyd iterations are ours because
their assignment step is balanced (no cluster above its capacity), which scikit-learn's KMeans
cannot do; they run on the sparse features, sparse @ dense centres.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Hashable, Sequence

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.cluster import kmeans_plusplus
from sklearn.metrics import normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix
from sklearn.utils.extmath import randomized_svd

from dfm.errors import DfmError
from dfm.progress import progress
from models.partition import (
    Docs,
    Features,
    Partition,
    cluster_means,
    fit_idf,
    normalise_rows,
    project,
    term_counts,
    tfidf,
)

#: The fewest training documents per cluster k-means is asked for on average: a cluster of one
#: document is that document (its expert memorises one text, its centre is the text itself).
MIN_DOCUMENTS_PER_CLUSTER = 2


def _rows(x: Features, index: np.ndarray) -> np.ndarray:
    """Dense copy of the rows ``index`` of ``x``."""
    return x[index].toarray() if sp.issparse(x) else x[index]


def _similarities(x: Features, centres: np.ndarray) -> torch.Tensor:
    """(N, K) dot products of feature rows with centres: cosine similarities of unit rows."""
    return torch.from_numpy(np.asarray(x @ centres.T))


# --- balanced spherical k-means ---------------------------------------------------------------


def balanced_assign(similarities: torch.Tensor, capacity: int) -> torch.Tensor:
    """(N,) cluster of each row of ``similarities`` (N, K), no cluster receiving more than ``capacity``.

    The result equals the greedy matching that walks all (doc, cluster) pairs by decreasing
    similarity (ties: lower doc, then lower cluster first) and takes a pair when the doc is still
    free and the cluster not full. It is computed as doc-proposing deferred acceptance, whose
    stable matching is that greedy one when both sides rank by the same pair order.
    """
    n, k = similarities.shape
    if capacity * k < n:
        raise DfmError(f"{k} clusters of capacity {capacity} cannot hold {n} documents: raise the balance factor")
    rows = torch.arange(n)
    preferences = torch.sort(similarities, dim=1, descending=True, stable=True).indices
    pointer = torch.zeros(n, dtype=torch.long)
    while True:
        target = preferences[rows, pointer]
        score = similarities[rows, target]
        order = torch.sort(score, descending=True, stable=True).indices
        order = order[torch.sort(target[order], stable=True).indices]
        counts = torch.bincount(target, minlength=k)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty(n, dtype=torch.long)
        rank[order] = torch.arange(n) - starts[target[order]]
        rejected = rank >= capacity
        if not rejected.any():
            return target
        pointer[rejected] += 1


def _lloyd(x: Features, centres: np.ndarray, capacity: int, iterations: int) -> tuple[torch.Tensor, np.ndarray]:
    """Balanced spherical Lloyd iterations from ``centres``; returns (assignments, centres)."""
    k = centres.shape[0]
    previous = None
    for _ in range(iterations):
        similarities = _similarities(x, centres)
        assignments = balanced_assign(similarities, capacity)
        centres = cluster_means(x, assignments.numpy(), k)
        empty = (torch.bincount(assignments, minlength=k) == 0).nonzero().flatten()
        if len(empty):  # re-seed empty clusters at the documents worst served by their centre
            own = similarities[torch.arange(len(assignments)), assignments]
            worst = torch.sort(own, stable=True).indices[: len(empty)]
            centres[empty.numpy()] = normalise_rows(_rows(x, worst.numpy()))
        elif previous is not None and torch.equal(assignments, previous):
            break
        previous = assignments
    return assignments, centres


def fit_kmeans(
    docs: Docs,
    num_clusters: int,
    vocab_size: int,
    *,
    balance: float = 2.0,
    svd_dim: int | None = None,
    iterations: int = 30,
    seed: int = 0,
    restarts: int = 3,
) -> Partition:
    """Balanced spherical k-means over tf-idf of tokenized documents.

    N must be at least MIN_DOCUMENTS_PER_CLUSTER * K, and no cluster gets more than
    ceil(balance * N / K) documents. The best of ``restarts`` runs from scikit-learn's (greedy)
    k-means++ seeding, by total document-centre cosine similarity, is kept. ``svd_dim`` projects
    the tf-idf vectors onto that many truncated-SVD directions first (scikit-learn's randomized
    SVD). Same seed, same result.
    """
    n = len(docs)
    if num_clusters < 1:
        raise DfmError(f"number of clusters must be >= 1, got {num_clusters}")
    if not balance >= 1:
        raise DfmError(f"balance must be >= 1 (cluster size cap = balance * N / K), got {balance}")
    if iterations < 1 or restarts < 1:
        raise DfmError(f"iterations and restarts must be >= 1, got {iterations} and {restarts}")
    if n < MIN_DOCUMENTS_PER_CLUSTER * num_clusters:
        raise DfmError(
            f"only {n} training documents for {num_clusters} clusters ({n / num_clusters:.2g} per cluster), "
            f"fewer documents than the {MIN_DOCUMENTS_PER_CLUSTER} per cluster a cluster needs to be a group: "
            f"lower --num-clusters to at most {max(1, n // MIN_DOCUMENTS_PER_CLUSTER)} or add documents"
        )
    counts = term_counts(docs, vocab_size)
    idf = fit_idf(counts)
    weighted = tfidf(counts, idf)
    projection = None
    if svd_dim is not None:
        if not 1 <= svd_dim <= min(n, vocab_size):
            raise DfmError(f"svd_dim must be in [1, min(N, V)] = [1, {min(n, vocab_size)}], got {svd_dim}")
        directions = randomized_svd(weighted, svd_dim, n_iter=4, random_state=seed)[2]
        projection = torch.from_numpy(np.ascontiguousarray(directions.T, dtype=np.float32))
    x = project(weighted, projection)
    capacity = math.ceil(balance * n / num_clusters)
    random_state = np.random.RandomState(seed)
    best = None
    for _ in progress(range(restarts), desc=f"partition: balanced k-means ({n} documents)", unit="restart"):
        start = normalise_rows(kmeans_plusplus(x, num_clusters, random_state=random_state)[0])
        assignments, centres = _lloyd(x, start, capacity, iterations)
        score = float(_similarities(x, centres)[torch.arange(n), assignments].double().sum())
        if best is None or score > best[0]:
            best = (score, assignments, centres)
    return Partition(centres=torch.from_numpy(best[2]), idf=idf, projection=projection, assignments=best[1])


def from_labels(
    docs: Docs, labels: Sequence[Hashable], vocab_size: int, values: Sequence[Hashable] | None = None
) -> Partition:
    """Partition by an existing label column: cluster ids are the sorted distinct labels (of
    ``values`` when given: every label of a corpus whose sample ``docs`` and ``labels`` are).

    ``label_values[k]`` is the original label of cluster k; centre k is the normalised mean tf-idf
    vector of its documents, so centroid routing works for label partitions too.
    """
    if isinstance(labels, torch.Tensor):
        labels = labels.tolist()
    if len(docs) != len(labels):
        raise DfmError(f"{len(docs)} documents but {len(labels)} labels: give one label per document")
    if not len(docs):
        raise DfmError("no documents to partition")
    values = _label_values(labels if values is None else values)
    index = {value: i for i, value in enumerate(values)}
    missing = {_plain(label) for label in labels} - set(values)
    if missing:
        raise DfmError(f"labels {sorted(map(str, missing))[:5]} are not among the label values {values[:10]}")
    assignments = torch.tensor([index[_plain(label)] for label in labels], dtype=torch.long)
    counts = term_counts(docs, vocab_size)
    idf = fit_idf(counts)
    return Partition(
        centres=torch.from_numpy(cluster_means(tfidf(counts, idf), assignments.numpy(), len(values))),
        idf=idf,
        projection=None,
        assignments=assignments,
        label_values=values,
    )


def _plain(label: Hashable) -> int | str:
    """Labels as JSON-safe ints or strings (numpy ints become ints)."""
    if isinstance(label, numbers.Integral) and not isinstance(label, bool):
        return int(label)
    if isinstance(label, str):
        return label
    raise DfmError(f"labels must be integers or strings, got {label!r} ({type(label).__name__})")


def _label_values(labels: Sequence[Hashable]) -> list:
    distinct = {_plain(label) for label in labels}
    try:
        return sorted(distinct)
    except TypeError as err:
        raise DfmError("labels mix integers and strings: use one type for the label column") from err


# --- statistics --------------------------------------------------------------------------------


def partition_stats(
    assignments: torch.Tensor, labels: Sequence[Hashable] | None, num_clusters: int | None = None
) -> dict:
    """{"sizes", "purity", "nmi"} of a clustering; purity and nmi are None without labels.

    purity = sum over clusters of the most common label count / N; nmi is mutual information
    normalised by the arithmetic mean of the two entropies (1.0 when both are a single class).
    """
    assignments = torch.as_tensor(assignments, dtype=torch.long).reshape(-1)
    if num_clusters is None:
        num_clusters = int(assignments.max()) + 1 if len(assignments) else 0
    stats = {"sizes": torch.bincount(assignments, minlength=num_clusters).tolist(), "purity": None, "nmi": None}
    if labels is None:
        return stats
    if isinstance(labels, torch.Tensor):
        labels = labels.tolist()
    if len(labels) != len(assignments):
        raise DfmError(f"{len(assignments)} assignments but {len(labels)} labels: give one label per document")
    if not len(labels):
        return stats
    label_index: dict = {}
    label_ids = [label_index.setdefault(label, len(label_index)) for label in labels]
    table = contingency_matrix(label_ids, assignments.numpy())  # (labels, clusters present)
    stats["purity"] = float(table.max(axis=0).sum() / len(labels))
    stats["nmi"] = float(normalized_mutual_info_score(label_ids, assignments.numpy(), average_method="arithmetic"))
    return stats
