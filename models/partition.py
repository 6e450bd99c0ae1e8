"""A fitted partition, c-BTM style: tf-idf features and one centre per cluster (fitting lives in
``training.partition``).

A :class:`Partition` holds the fitted idf weights, an optional truncated-SVD projection, one
L2-normalised centre per cluster and the cluster of every training document. It also scores new
text against the centres, which is what the ``centroid`` routing mode uses: expert k gets weight
softmax(-d_k^2 / T), d_k the distance of the prefix's normalised tf-idf vector to centre k.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dfm.atomic import atomic_dir, write_json
from dfm.errors import DfmError

Docs = Sequence[Sequence[int]]

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

    def features(self, docs: Docs) -> torch.Tensor:
        """(N, D) dense L2-normalised tf-idf vectors (zero rows for empty documents)."""
        return _densify(project_features(tfidf_matrix(term_counts(docs, self.vocab_size), self.idf), self.projection))

    def sq_distances(self, docs: Docs) -> torch.Tensor:
        """(N, K) squared euclidean distances of each document's features to each centre."""
        return _sq_distances(self.features(docs), self.centres)

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


@dataclass
class _Counts:
    """Sparse term counts: entry i says token ``tokens[i]`` occurs ``counts[i]`` times in ``docs[i]``."""

    num_docs: int
    vocab_size: int
    docs: torch.Tensor
    tokens: torch.Tensor
    counts: torch.Tensor


def term_counts(docs: Docs, vocab_size: int) -> _Counts:
    """Count every distinct token id of every document (lists or 1-d tensors of ids)."""
    pieces = [
        d.reshape(-1).long() if isinstance(d, torch.Tensor) else torch.as_tensor(d, dtype=torch.long) for d in docs
    ]
    lengths = torch.tensor([len(p) for p in pieces], dtype=torch.long)
    flat = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    if len(flat) and (int(flat.min()) < 0 or int(flat.max()) >= vocab_size):
        raise DfmError(
            f"token ids must lie in [0, {vocab_size}), found {int(flat.min())}..{int(flat.max())}: "
            "use the tokenizer the partition was fitted with"
        )
    doc_ids = torch.repeat_interleave(torch.arange(len(pieces)), lengths)
    keys, counts = torch.unique(doc_ids * vocab_size + flat, sorted=True, return_counts=True)
    return _Counts(len(pieces), vocab_size, keys // vocab_size, keys % vocab_size, counts)


def smooth_idf(counts: _Counts) -> torch.Tensor:
    """log((1 + N) / (1 + df)) + 1 for every token id."""
    df = torch.bincount(counts.tokens, minlength=counts.vocab_size).double()
    return (torch.log((1 + counts.num_docs) / (1 + df)) + 1).float()


def tfidf_matrix(counts: _Counts, idf: torch.Tensor) -> torch.Tensor:
    """(N, V) sparse COO matrix of sublinear tf (1 + log count) times idf, rows L2-normalised."""
    values = (1 + torch.log(counts.counts.float())) * idf[counts.tokens]
    norms = torch.zeros(counts.num_docs).index_add_(0, counts.docs, values.square()).sqrt()
    values = values / norms[counts.docs]
    return torch.sparse_coo_tensor(
        torch.stack([counts.docs, counts.tokens]),
        values,
        (counts.num_docs, counts.vocab_size),
        is_coalesced=True,
        check_invariants=False,
    )


def normalise_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm; zero rows stay zero."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def project_features(x: torch.Tensor, projection: torch.Tensor | None) -> torch.Tensor:
    """Sparse tf-idf as is, or projected (dense) and re-normalised."""
    return x if projection is None else normalise_rows(x @ projection)


def _densify(x: torch.Tensor) -> torch.Tensor:
    return x.to_dense() if x.is_sparse else x


def _sq_distances(features: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(N, K) squared distances between dense feature rows and centres."""
    sq = features.square().sum(-1, keepdim=True) + centres.square().sum(-1) - 2 * (features @ centres.T)
    return sq.clamp_min(0)
