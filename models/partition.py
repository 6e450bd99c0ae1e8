"""A fitted partition, c-BTM style: tf-idf features and one centre per cluster (fitting lives in
``training.clustering``).

A :class:`Partition` holds the fitted idf weights, an optional truncated-SVD projection, one
L2-normalised centre per cluster and the cluster of every training document. It also scores new
text against the centres, which is what the ``centroid`` routing mode uses: expert k gets weight
softmax(-d_k^2 / T), d_k the distance of the prefix's normalised tf-idf vector to centre k.

Features stay sparse: scikit-learn's ``TfidfTransformer`` weighs a scipy CSR count matrix, and
distances come from sparse @ dense centres, (N, K), never from an (N, V) dense matrix.
scikit-learn is imported where tf-idf is computed, not with this module: it costs about 1.5 s
and 170 MB of RSS to import, and every process that loads an ensemble imports ``Partition``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dfm.atomic import atomic_dir, write_json
from dfm.errors import DfmError

Docs = Sequence[Sequence[int]]
#: Feature rows: sparse (N, V) tf-idf, or dense (N, D) when the partition projects them.
Features = sp.csr_matrix | np.ndarray

_TENSORS_FILE = "centres.safetensors"
_META_FILE = "partition.json"
_FORMAT = "dfm-partition"
_VERSION = 1


@dataclass
class Partition:
    """Cluster centres over (optionally projected) tf-idf features, plus training assignments."""

    centres: torch.Tensor  # (K, D) float32, rows L2-normalised (zero for a cluster of empty docs)
    idf: torch.Tensor  # (V,) float32
    projection: torch.Tensor | None  # (V, D) float32 or None (then D == V)
    assignments: torch.Tensor  # (N,) long
    label_values: list | None = field(default=None)  # original label of each cluster id

    @property
    def num_clusters(self) -> int:
        return self.centres.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.idf.shape[0]

    @property
    def sizes(self) -> list[int]:
        return torch.bincount(self.assignments, minlength=self.num_clusters).tolist()

    def features(self, docs: Docs) -> Features:
        """(N, V) sparse L2-normalised tf-idf rows (empty documents: empty rows), or, with a
        projection, their (N, D) dense projections, re-normalised."""
        return project(tfidf(term_counts(docs, self.vocab_size), self.idf), self.projection)

    def sq_distances(self, docs: Docs) -> torch.Tensor:
        """(N, K) squared euclidean distances of each document's features to each centre."""
        return sq_distances(self.features(docs), self.centres)

    def centre(self, docs: Docs) -> torch.Tensor:
        """(D,) the centre a cluster of exactly these documents gets: their features' normalised sum."""
        features = self.features(docs)
        return torch.from_numpy(cluster_means(features, np.zeros(features.shape[0], dtype=np.int64), 1)[0])

    def log_weights(self, docs: Docs, temperature: float) -> torch.Tensor:
        """(N, K) log softmax(-d^2 / temperature) over clusters (centroid routing)."""
        if not temperature > 0:
            raise DfmError(f"centroid routing temperature must be > 0, got {temperature}")
        return torch.log_softmax(-self.sq_distances(docs) / temperature, dim=-1)

    def assign(self, docs: Docs) -> torch.Tensor:
        """(N,) nearest centre of each document (no balance constraint; ties -> lowest id)."""
        return self.sq_distances(docs).argmin(dim=-1)

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``centres.safetensors`` and ``partition.json`` into ``directory`` atomically."""
        tensors = {
            "centres": self.centres.contiguous(),
            "idf": self.idf.contiguous(),
            "assignments": self.assignments.contiguous(),
        }
        if self.projection is not None:
            tensors["projection"] = self.projection.contiguous()
        meta = {
            "format": _FORMAT,
            "version": _VERSION,
            "num_clusters": self.num_clusters,
            "dim": self.centres.shape[1],
            "vocab_size": self.vocab_size,
            "num_documents": self.assignments.shape[0],
            "projection": self.projection is not None,
            "label_values": self.label_values,
            "sizes": self.sizes,
        }
        with atomic_dir(directory) as tmp:
            save_file(tensors, str(tmp / _TENSORS_FILE))
            write_json(tmp / _META_FILE, meta)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Partition:
        directory = Path(directory)
        try:
            meta = json.loads((directory / _META_FILE).read_text())
            tensors = load_file(str(directory / _TENSORS_FILE))
        except FileNotFoundError as err:
            raise DfmError(
                f"no partition at {directory} ({err.filename} missing): run the partition step first"
            ) from err
        except (OSError, ValueError, SafetensorError) as err:
            raise DfmError(f"partition at {directory} is unreadable ({err}): delete it and partition again") from err
        problem = _check_loaded(meta, tensors)
        if problem:
            raise DfmError(f"partition at {directory} is corrupt ({problem}): delete it and partition again")
        return cls(
            centres=tensors["centres"],
            idf=tensors["idf"],
            projection=tensors.get("projection"),
            assignments=tensors["assignments"],
            label_values=meta["label_values"],
        )


def _check_loaded(meta: object, tensors: dict[str, torch.Tensor]) -> str | None:
    """A description of what is inconsistent in a loaded partition, or None."""
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
        return f"{_META_FILE} is not a {_FORMAT} v{_VERSION} file"
    expected = {"centres", "idf", "assignments"} | ({"projection"} if meta.get("projection") else set())
    if set(tensors) != expected:
        return f"tensors {sorted(tensors)} != {sorted(expected)}"
    centres, idf, assignments = tensors["centres"], tensors["idf"], tensors["assignments"]
    k, v, dim = meta.get("num_clusters"), meta.get("vocab_size"), meta.get("dim")
    if "projection" not in tensors and dim != v:
        return f"dim {dim} != vocab_size {v} without a projection"
    if centres.dtype != torch.float32 or tuple(centres.shape) != (k, dim):
        return f"centres {tuple(centres.shape)} do not match K={k}, D={dim}"
    if idf.dtype != torch.float32 or tuple(idf.shape) != (v,):
        return f"idf {tuple(idf.shape)} does not match V={v}"
    if "projection" in tensors and tuple(tensors["projection"].shape) != (v, dim):
        return f"projection {tuple(tensors['projection'].shape)} is not ({v}, {dim})"
    if assignments.dtype != torch.long or assignments.dim() != 1 or len(assignments) != meta.get("num_documents"):
        return "assignments do not match num_documents"
    if len(assignments) and not (0 <= int(assignments.min()) and int(assignments.max()) < k):
        return "assignments out of range"
    labels = meta.get("label_values")
    if labels is not None and (not isinstance(labels, list) or len(labels) != k):
        return "label_values do not match num_clusters"
    return None


# --- tf-idf -----------------------------------------------------------------------------------


def term_counts(docs: Docs, vocab_size: int) -> sp.csr_matrix:
    """(N, V) float32 sparse count of every token id in every document (lists or 1-d tensors of ids)."""
    pieces = [np.asarray(d.reshape(-1) if isinstance(d, torch.Tensor) else d, dtype=np.int64) for d in docs]
    flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    if len(flat) and (int(flat.min()) < 0 or int(flat.max()) >= vocab_size):
        raise DfmError(
            f"token ids must lie in [0, {vocab_size}), found {int(flat.min())}..{int(flat.max())}: "
            "use the tokenizer the partition was fitted with"
        )
    indptr = np.concatenate([[0], np.cumsum([len(p) for p in pieces], dtype=np.int64)])
    counts = sp.csr_matrix((np.ones(len(flat), dtype=np.float32), flat, indptr), shape=(len(pieces), vocab_size))
    counts.sum_duplicates()
    return counts


def fit_idf(counts: sp.csr_matrix) -> torch.Tensor:
    """(V,) float32 smooth idf of every token id, log((1 + N) / (1 + df)) + 1 (computed in float64)."""
    from sklearn.feature_extraction.text import TfidfTransformer

    return torch.from_numpy(TfidfTransformer(smooth_idf=True).fit(counts.astype(np.float64)).idf_.astype(np.float32))


def tfidf(counts: sp.csr_matrix, idf: torch.Tensor) -> sp.csr_matrix:
    """(N, V) float32 sparse sublinear tf (1 + log count) times ``idf``, rows L2-normalised."""
    if counts.shape[0] == 0:  # scikit-learn refuses an empty batch; its tf-idf is the empty matrix
        return counts
    from sklearn.feature_extraction.text import TfidfTransformer

    transformer = TfidfTransformer(norm="l2", sublinear_tf=True)
    transformer.idf_ = idf.numpy()
    return transformer.transform(counts).astype(np.float32, copy=False)


def project(x: sp.csr_matrix, projection: torch.Tensor | None) -> Features:
    """Sparse tf-idf as is, or projected onto ``projection`` (V, D), dense (N, D), re-normalised."""
    return x if projection is None else normalise_rows(x @ projection.numpy())


def cluster_means(x: Features, assignments: np.ndarray, num_clusters: int) -> np.ndarray:
    """(K, D) L2-normalised sums of the rows of ``x`` in each cluster (zero for an empty cluster)."""
    n = x.shape[0]
    indicator = sp.csr_matrix((np.ones(n, dtype=np.float32), (assignments, np.arange(n))), shape=(num_clusters, n))
    sums = indicator @ x
    return normalise_rows(sums.toarray() if sp.issparse(sums) else sums)


def normalise_rows(x: np.ndarray) -> np.ndarray:
    """Rows of a dense matrix scaled to unit L2 norm; zero rows stay zero."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(x.dtype).tiny)


def _row_sq_norms(x: Features) -> np.ndarray:
    """(N,) squared L2 norm of every row of a sparse or dense matrix."""
    return np.asarray(x.multiply(x).sum(axis=1)).ravel() if sp.issparse(x) else np.square(x).sum(axis=1)


def sq_distances(x: Features, centres: torch.Tensor) -> torch.Tensor:
    """(N, K) float32 squared distances |x|^2 + |c|^2 - 2 x.c of feature rows to centres, clamped at 0."""
    c = centres.numpy()
    sq = _row_sq_norms(x)[:, None] + _row_sq_norms(c)[None, :] - 2 * np.asarray(x @ c.T)
    return torch.from_numpy(np.maximum(sq, 0).astype(np.float32, copy=False))
