"""Adding an expert later: a new cluster of documents joins a prepared run, the others untouched.

``add_cluster`` makes the new documents cluster K (K = the run's current number of clusters):
it appends them to ``RUN/data/documents``, writes shard K, gives the partition a K-th centre,
recomputes sizes and priors, and raises ``partition.num_clusters`` in ``RUN/config.json``.
Experts 0..K-1, their shards and checkpoints are not touched. The router's checkpoints are
deleted: they belong to a router over K experts and can never be resumed. Then: train expert K,
retrain the router, assemble.

``config.json`` is written last. If the call is interrupted before that, the run still says K
clusters, and calling it again rebuilds cluster K from the first K clusters' state.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import datasets
import torch
from datasets import Dataset, DatasetDict

from dfm.atomic import write_json
from dfm.errors import DfmError
from models.partition import Partition
from models.scoring import document_bos
from models.tokenizer import load_tokenizer
from training.allocation import read_share, write_share
from training.clustering import partition_stats
from training.config import read_run_config
from training.data import DataSource, carve_splits, load_documents, load_saved, save_dataset, tokenize
from training.layout import RunLayout
from training.prepare import row_builder, write_shard


def read_texts(source: DataSource) -> list[str]:
    """Every document of ``source`` (all its splits); add_cluster carves its own held-out share.
    Rows without text are refused by ``load_documents``."""
    documents = load_documents(source)
    return [text for split in documents.values() for text in split[source.text_column]]


def _without_cluster(split: Dataset, k: int) -> Dataset:
    """The rows of clusters below k (drops what an interrupted earlier call appended)."""
    keep = [i for i, c in enumerate(split["cluster"]) if c < k]
    return split if len(keep) == len(split) else split.select(keep)


def _refuse_known(new: Dataset, old: Dataset, run_dir: Path) -> None:
    """Refuse documents that all belong to the run already (the same data added twice)."""
    known = {tuple(ids): cluster for ids, cluster in zip(old["input_ids"], old["cluster"], strict=True)}
    clusters = {known.get(tuple(ids)) for ids in new["input_ids"]}
    if None not in clusters:
        raise DfmError(
            f"every new training document is already in {run_dir} (cluster(s) "
            f"{sorted(clusters)}): these documents were added before; nothing to do"
        )


def _like(new: Dataset, old: Dataset) -> Dataset:
    """``new`` with the columns and features of ``old``; columns it lacks (labels) are empty."""
    for name in old.column_names:
        if name not in new.column_names:
            new = new.add_column(name, [None] * len(new))
    return new.select_columns(old.column_names).cast(old.features)


def _stats(partition: Partition, train: Dataset, label_column: str | None) -> dict:
    """stats.json as `dfm prepare` writes it; purity and nmi over the documents that carry a label."""
    labels = list(train[label_column]) if label_column in train.column_names else None
    if labels is not None:
        labelled = torch.tensor([label is not None for label in labels], dtype=torch.bool)
        stats = partition_stats(
            partition.assignments[labelled], [x for x in labels if x is not None], partition.num_clusters
        )
    else:
        stats = partition_stats(partition.assignments, None, partition.num_clusters)
    sizes = partition.sizes
    return {
        **stats,
        "sizes": sizes,
        "priors": [size / sum(sizes) for size in sizes],
        "label_values": partition.label_values,
    }


def add_cluster(run_dir: str | Path, texts: Sequence[str]) -> int:
    """Add ``texts`` to the prepared run as a new cluster; returns its index K."""
    run_dir = Path(run_dir)
    layout = RunLayout.of(run_dir)
    config = read_run_config(run_dir)
    k = config.partition.num_clusters
    if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
        raise DfmError("the new cluster's documents must be a list of strings")
    if not any(text.strip() for text in texts):
        raise DfmError("the new cluster has no non-empty documents: check the dataset and --text-column")
    data = config.data
    source = DataSource(
        validation_fraction=data.validation_fraction, test_fraction=data.test_fraction, seed=config.seed
    )
    column = data.text_column
    tokenizer = load_tokenizer(layout.tokenizer)
    carved = carve_splits({"train": Dataset.from_dict({column: list(texts)})}, source)
    new = DatasetDict({name: tokenize(split, tokenizer, column, config.num_proc) for name, split in carved.items()})
    new = DatasetDict({name: split.add_column("cluster", [k] * len(split)) for name, split in new.items()})

    documents = load_saved(layout.documents, "the tokenized documents")
    old = {name: _without_cluster(split, k) for name, split in documents.items()}
    _refuse_known(new["train"], old["train"], run_dir)
    partition = Partition.load(layout.partition)
    assignments = partition.assignments[partition.assignments < k]
    if partition.num_clusters < k or len(assignments) != len(old["train"]):
        raise DfmError(
            f"{layout.partition} does not match {layout.documents} ({len(assignments)} assignments for "
            f"{len(old['train'])} documents): run `dfm prepare --out {run_dir}` again"
        )

    targets = write_shard(
        new, "cluster", k, row_builder(config, tokenizer.eos_token_id, document_bos(tokenizer)), layout.shard(k)
    )
    shares = [read_share(layout, j) for j in range(k)]
    if all(shares):  # the trained experts' shards stay as they are; a run prepared without shares gets none
        write_share(layout, k, targets, sum(share["targets"] for share in shares) + targets, k + 1)
    merged = DatasetDict(
        {name: datasets.concatenate_datasets([old[name], _like(new[name], old[name])]) for name in old}
    )
    centre = partition.centre(list(new["train"]["input_ids"]))
    labels = None if partition.label_values is None else [*partition.label_values[:k], None]
    partition = Partition(
        centres=torch.cat([partition.centres[:k], centre[None]]),
        idf=partition.idf,
        projection=partition.projection,
        assignments=torch.cat([assignments, torch.full((len(new["train"]),), k)]),
        label_values=labels,
    )
    save_dataset(merged, layout.documents)
    partition.save(layout.partition)
    write_json(layout.partition / "stats.json", _stats(partition, merged["train"], data.label_column))
    shutil.rmtree(layout.checkpoints("router"), ignore_errors=True)
    write_json(layout.config, replace(config, partition=replace(config.partition, num_clusters=k + 1)).to_dict())
    return k
