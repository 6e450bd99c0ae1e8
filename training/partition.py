"""Corpus partitioning, c-BTM style: tf-idf features and balanced spherical k-means, fitted into
a ``models.partition.Partition``; and the partition's statistics against reference labels."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Hashable, Sequence

import torch

from dfm.errors import DfmError
from dfm.progress import progress
from models.partition import Docs, Partition, normalise_rows, project_features, smooth_idf, term_counts, tfidf_matrix


#: The fewest training documents per cluster k-means is asked for on average: a cluster of one
#: document is that document (its expert memorises one text, its centre is the text itself).
MIN_DOCUMENTS_PER_CLUSTER = 2


def _fit_matrix(tfidf: torch.Tensor, projection: torch.Tensor | None) -> torch.Tensor:
    """Features for fitting: dense if projected, else sparse CSR (fast sparse @ dense)."""
    if projection is not None:
        return project_features(tfidf, projection)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return tfidf.to_sparse_csr()


def _csr_rows(x: torch.Tensor) -> torch.Tensor:
    """Row index of every stored value of a sparse CSR matrix."""
    return torch.repeat_interleave(torch.arange(x.shape[0]), x.crow_indices().diff())


def _row_sq_norms(x: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each row of a dense or sparse CSR matrix."""
    if x.layout != torch.sparse_csr:
        return x.square().sum(-1)
    return torch.zeros(x.shape[0]).index_add_(0, _csr_rows(x), x.values().square())


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Dense copy of the rows ``index`` of a dense or sparse CSR matrix."""
    if x.layout != torch.sparse_csr:
        return x[index]
    crow, cols, values = x.crow_indices(), x.col_indices(), x.values()
    out = torch.zeros(len(index), x.shape[1])
    for i, row in enumerate(index.tolist()):
        start, end = int(crow[row]), int(crow[row + 1])
        out[i, cols[start:end]] = values[start:end]
    return out


def _cluster_means(x: torch.Tensor, assignments: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """(K, D) L2-normalised sums of the rows of ``x`` (dense or sparse CSR) in each cluster."""
    sums = torch.zeros(num_clusters, x.shape[1])
    if x.layout != torch.sparse_csr:
        return normalise_rows(sums.index_add_(0, assignments, x))
    flat = assignments[_csr_rows(x)] * x.shape[1] + x.col_indices()
    sums.view(-1).index_add_(0, flat, x.values())
    return normalise_rows(sums)


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


def _kmeans_pp(x: torch.Tensor, num_clusters: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: (K, D) centres at documents drawn with probability proportional to d^2."""
    n = x.shape[0]
    sq_norms = _row_sq_norms(x)
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    nearest = torch.full((n,), float("inf"))
    for _ in range(1, num_clusters):
        centre = _rows(x, torch.tensor(chosen[-1:]))[0]
        nearest = torch.minimum(nearest, (sq_norms + centre.square().sum() - 2 * (x @ centre)).clamp_min(0))
        weights = nearest.clone()
        weights[chosen] = 0
        if not weights.sum() > 0:  # every remaining document coincides with a centre
            weights = torch.ones(n)
            weights[chosen] = 0
        chosen.append(int(torch.multinomial(weights, 1, generator=generator)))
    return normalise_rows(_rows(x, torch.tensor(chosen)))


def _lloyd(x: torch.Tensor, centres: torch.Tensor, capacity: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced spherical Lloyd iterations from ``centres``; returns (assignments, centres)."""
    k = centres.shape[0]
    previous = None
    for _ in range(iterations):
        similarities = x @ centres.T
        assignments = balanced_assign(similarities, capacity)
        centres = _cluster_means(x, assignments, k)
        empty = (torch.bincount(assignments, minlength=k) == 0).nonzero().flatten()
        if len(empty):  # re-seed empty clusters at the documents worst served by their centre
            own = similarities[torch.arange(len(assignments)), assignments]
            worst = torch.sort(own, stable=True).indices[: len(empty)]
            centres[empty] = normalise_rows(_rows(x, worst))
        elif previous is not None and torch.equal(assignments, previous):
            break
        previous = assignments
    return assignments, centres


def fit_kmeans(
    docs: Docs,
    num_clusters: int,
    vocab_size: int,
    *,
    balance: float = 1.2,
    svd_dim: int | None = None,
    iterations: int = 30,
    seed: int = 0,
    restarts: int = 3,
) -> Partition:
    """Balanced spherical k-means over tf-idf of tokenized documents.

    N must be at least MIN_DOCUMENTS_PER_CLUSTER * K, and no cluster gets more than
    ceil(balance * N / K) documents. The best of ``restarts`` k-means++ seedings (by total
    document-centre cosine similarity) is kept. ``svd_dim`` projects the tf-idf vectors onto that
    many truncated-SVD directions first. Same seed, same result.
    """
    n = len(docs)
    if num_clusters < 1:
        raise DfmError(f"number of clusters must be >= 1, got {num_clusters}")
    if not balance >= 1:
        raise DfmError(f"balance must be >= 1 (cluster size cap = balance * N / K), got {balance}")
    if iterations < 1 or restarts < 1:
        raise DfmError(f"iterations and restarts must be >= 1, got {iterations} and {restarts}")
    if n < MIN_DOCUMENTS_PER_CLUSTER * num_clusters:
        raise DfmError(f"only {n} training documents for {num_clusters} clusters ({n / num_clusters:.2g} per cluster), "
                       f"fewer documents than the {MIN_DOCUMENTS_PER_CLUSTER} per cluster a cluster needs to be a group: "
                       f"lower --num-clusters to at most {max(1, n // MIN_DOCUMENTS_PER_CLUSTER)} or add documents")
    counts = term_counts(docs, vocab_size)
    idf = smooth_idf(counts)
    tfidf = tfidf_matrix(counts, idf)
    projection = None
    if svd_dim is not None:
        if not 1 <= svd_dim <= min(n, vocab_size):
            raise DfmError(f"svd_dim must be in [1, min(N, V)] = [1, {min(n, vocab_size)}], got {svd_dim}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            projection = torch.svd_lowrank(tfidf, q=svd_dim, niter=4)[2].contiguous()
    x = _fit_matrix(tfidf, projection)
    capacity = math.ceil(balance * n / num_clusters)
    generator = torch.Generator().manual_seed(seed)
    best = None
    for _ in progress(range(restarts), desc=f"partition: balanced k-means ({n} documents)", unit="restart"):
        start = _kmeans_pp(x, num_clusters, generator)
        assignments, centres = _lloyd(x, start, capacity, iterations)
        score = float((x @ centres.T)[torch.arange(n), assignments].double().sum())
        if best is None or score > best[0]:
            best = (score, assignments, centres)
    return Partition(centres=best[2], idf=idf, projection=projection, assignments=best[1])


def from_labels(docs: Docs, labels: Sequence[Hashable], vocab_size: int,
                values: Sequence[Hashable] | None = None) -> Partition:
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
    idf = smooth_idf(counts)
    x = _fit_matrix(tfidf_matrix(counts, idf), None)
    return Partition(
        centres=_cluster_means(x, assignments, len(values)),
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
    label_ids = torch.tensor([label_index.setdefault(label, len(label_index)) for label in labels])
    _, clusters = torch.unique(assignments, return_inverse=True)
    table = torch.zeros(int(clusters.max()) + 1, len(label_index), dtype=torch.float64)
    table.index_put_((clusters, label_ids), torch.ones(len(labels), dtype=torch.float64), accumulate=True)
    n = table.sum()
    stats["purity"] = float(table.max(dim=1).values.sum() / n)
    stats["nmi"] = _nmi(table / n)
    return stats


def _entropy(p: torch.Tensor) -> torch.Tensor:
    p = p[p > 0]
    return -(p * p.log()).sum()


def _nmi(joint: torch.Tensor) -> float:
    rows, cols = joint.sum(1), joint.sum(0)
    if len(rows) == len(cols) == 1:
        return 1.0
    nz = joint > 0
    mutual = (joint[nz] * (joint[nz] / (rows[:, None] * cols[None, :])[nz]).log()).sum()
    return float((mutual / ((_entropy(rows) + _entropy(cols)) / 2)).clamp(0, 1))
