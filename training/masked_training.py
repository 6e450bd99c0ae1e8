"""Training on the masked path: rows of single documents, and the path's ELBO loss for the shared trainer."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import datasets
import torch
from torch import Tensor, nn

from dfm.errors import DfmError
from dfm.loss import masked_dfm_loss
from dfm.masked_path import MaskedPath
from models.masked_expert import clean_logits
from models.router import state_logits
from training.data import READ_BATCH
from training.trainer import LossFn


def document_row_iter(
    ds: datasets.Dataset, block_size: int, eos_id: int, columns: Sequence[str] = ()
) -> Iterator[dict]:
    """One row per ``block_size`` tokens of one document and its closing EOS (never two documents
    in a row: a bidirectional model would read across them). Short rows are padded with EOS and
    marked 0 in ``attention_mask``; every row copies its document's ``columns`` (e.g. "cluster").
    Documents are read in batches, so memory holds one batch, never the corpus."""
    if block_size < 1:
        raise DfmError("block size must be at least 1")
    for batch in ds.select_columns(["input_ids", *columns]).iter(batch_size=READ_BATCH):
        for d, ids in enumerate(batch["input_ids"]):
            ids = [*ids, eos_id]  # the end of a document is a token to learn (and to generate)
            for start in range(0, len(ids), block_size):
                chunk = ids[start : start + block_size]
                pad = block_size - len(chunk)
                yield {
                    "input_ids": chunk + [eos_id] * pad,
                    "attention_mask": [1] * len(chunk) + [0] * pad,
                    **{column: batch[column][d] for column in columns},
                }


def document_rows(ds: datasets.Dataset, block_size: int, eos_id: int, columns: Sequence[str] = ()) -> datasets.Dataset:
    """``document_row_iter`` collected into an in-memory dataset (for small inputs)."""
    return datasets.Dataset.from_list(list(document_row_iter(ds, block_size, eos_id, columns)))


def _noisy_state(path: MaskedPath, x1: Tensor, attention: Tensor) -> tuple[Tensor, Tensor]:
    """(X_t, t) for rows ``x1`` at t ~ U[0, 1) per row, from torch's global generator; padding never masked."""
    t = torch.rand(x1.shape[0], dtype=torch.float64).to(x1.device)
    return torch.where(attention.bool(), path.sample(x1, t), x1), t


def masked_loss(path: MaskedPath) -> LossFn:
    """The loss the trainer minimises for a masked expert: t ~ U[0, 1) per row, X_t from the path
    (padding never masked), and the ELBO per real token. Randomness comes from torch's global
    generator, which the trainer seeds and checkpoints, so runs and resumes are reproducible."""

    def loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        x1, attention = batch["input_ids"], batch["attention_mask"]
        xt, t = _noisy_state(path, x1, attention)
        return masked_dfm_loss(clean_logits(model, xt, attention), x1, xt, t, path, attention)

    return loss


def noisy_router_loss(path: MaskedPath) -> LossFn:
    """Cross-entropy of the router's P(k | X_t) against the row's cluster, X_t drawn from the path at
    t ~ U[0, 1) (the router of Decentralized Diffusion Models). The router reads X_t causally; its
    output at the last real token has seen the whole state."""

    def loss(router: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        x1, attention = batch["input_ids"], batch["attention_mask"]
        xt, _ = _noisy_state(path, x1, attention)
        return torch.nn.functional.cross_entropy(state_logits(router, xt, attention).float(), batch["cluster"])

    return loss
