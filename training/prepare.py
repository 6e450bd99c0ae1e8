"""`dfm prepare`: documents, tokenizer and partition, written into the run directory."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import datasets
import torch
from datasets import DatasetDict

from dfm.atomic import atomic_dir, write_json
from dfm.errors import DfmError
from models.partition import Partition
from models.scoring import document_bos
from training.allocation import write_shares
from training.clustering import fit_kmeans, from_labels, partition_stats
from training.data import (
    READ_BATCH,
    DataSource,
    carve_splits,
    column_tensor,
    document_row_iter,
    load_documents,
    packed_rows,
    rows_on_disk,
    sample_documents,
    save_dataset,
    tokenize,
)
from training.layout import RunLayout
from training.run_config import RunConfig
from training.synthetic import SyntheticCorpus, SyntheticSpec
from training.tokenizer_training import existing_tokenizer, save_tokenizer, text_batches, train_bpe


def data_source(config: RunConfig) -> DataSource:
    data = config.data
    fields = {
        k: getattr(data, k)
        for k in (
            "dataset",
            "config_name",
            "split",
            "data_files",
            "text_column",
            "streaming",
            "max_documents",
            "validation_fraction",
            "test_fraction",
        )
    }
    if isinstance(fields["data_files"], str):
        fields["data_files"] = [fields["data_files"]]
    fields["data_files"] = split_data_files(fields["data_files"])
    return DataSource(**fields, seed=config.seed)


def split_data_files(files: list[str] | None) -> list[str] | dict[str, list[str]] | None:
    """``["train=a.jsonl", "test=b.jsonl"]`` -> {"train": ["a.jsonl"], "test": ["b.jsonl"]} (one split
    per file, as ``load_dataset(data_files={...})`` takes them); plain paths stay a list (all train)."""
    if not files or not any("=" in f for f in files):
        return files
    if not all("=" in f for f in files):
        raise DfmError(f"--data-files mixes SPLIT=PATH and plain paths ({files}): name a split for every file")
    out: dict[str, list[str]] = {}
    for item in files:
        split, path = item.split("=", 1)
        out.setdefault(split.strip(), []).append(path)
    return out


def load_corpus(config: RunConfig, scratch: str | Path | None = None) -> DatasetDict:
    """The configured dataset, or the embedded synthetic corpus when none is named (a streamed
    dataset is written under ``scratch``)."""
    source = data_source(config)
    if source.dataset is not None:
        return load_documents(source, scratch)
    corpus = SyntheticCorpus(SyntheticSpec.from_dict(config.synthetic))
    return DatasetDict(carve_splits({"train": corpus.to_dataset()}, source))


def _partition(config: RunConfig, train: datasets.Dataset, vocab_size: int) -> Partition:
    """The partition fitted on a seeded sample of at most ``partition.sample_documents`` training
    documents (all of them in a small corpus): k-means, or the centres of the ``cluster_column`` labels."""
    part = config.partition
    sample = sample_documents(train, part.sample_documents, config.seed)
    docs = list(sample["input_ids"])
    column = config.data.cluster_column
    if column is not None:
        if column not in train.column_names:
            raise DfmError(
                f"--cluster-column {column!r} is not a column of the dataset (columns: {train.column_names})"
            )
        return from_labels(docs, list(sample[column]), vocab_size, values=train.unique(column))
    return fit_kmeans(
        docs,
        part.num_clusters,
        vocab_size,
        balance=part.balance,
        svd_dim=part.svd_dim,
        iterations=part.iterations,
        seed=config.seed,
    )


def with_clusters(split: datasets.Dataset, partition: Partition, column: str | None) -> datasets.Dataset:
    """``split`` with a "cluster" column, computed batch by batch: each document's label in
    ``column``, or else its nearest centre."""
    if column is None:

        def assign(batch: dict) -> dict:
            return {"cluster": partition.assign(batch["input_ids"]).tolist()}
    else:
        index = {value: k for k, value in enumerate(partition.label_values)}

        def assign(batch: dict) -> dict:
            unknown = sorted({str(v) for v in batch[column] if v not in index})
            if unknown:
                raise DfmError(
                    f"held-out documents carry labels never seen in training: {unknown[:5]}; fix --cluster-column"
                )
            return {"cluster": [index[v] for v in batch[column]]}

    return split.map(assign, batched=True, batch_size=READ_BATCH, desc="assign clusters")


def shared_flags(split: datasets.Dataset, config: RunConfig) -> list[bool]:
    """Which documents every owner may share (the seed model's data): the ``shared_column``, or
    else a fixed fraction of every cluster's documents, chosen by a seeded draw per cluster."""
    seed = config.seed_model
    column = seed.shared_column
    if column is not None:
        if column not in split.column_names:
            raise DfmError(f"--shared-column {column!r} is not a column of the dataset (columns: {split.column_names})")
        return [bool(v) for v in split[column]]
    clusters = column_tensor(split, "cluster")
    flags = torch.zeros(len(clusters), dtype=torch.bool)
    generator = torch.Generator().manual_seed(config.seed)
    for k in clusters.unique().tolist():
        members = (clusters == k).nonzero().flatten()
        count = max(1, round(len(members) * seed.shared_fraction))
        flags[members[torch.randperm(len(members), generator=generator)[:count]]] = True
    return flags.tolist()


#: Turns documents into training rows: packed causal blocks (ar) or one document per row (masked).
RowBuilder = Callable[[datasets.Dataset], Iterator[dict]]


def row_builder(config: RunConfig, eos_id: int, bos_id: int | None = None) -> RowBuilder:
    """How the run's path trains: ``packed_rows`` for ar (documents read from ``bos_id``, default
    ``eos_id``), ``document_row_iter`` for masked (no BOS), at ``expert.block_size``."""
    block = config.expert.block_size
    if config.is_masked:
        return lambda docs: document_row_iter(docs, block, eos_id)
    return lambda docs: packed_rows(docs, block, eos_id, bos_id)


def training_targets(rows: datasets.Dataset) -> int:
    """Tokens a model learns from in ``rows``: labels of packed blocks (a block's first label is
    its input only), or the real tokens of document rows; counted batch by batch."""
    packed = "labels" in rows.column_names
    column = "labels" if packed else "attention_mask"
    total = 0
    for batch in rows.select_columns([column]).with_format("torch").iter(batch_size=READ_BATCH):
        values = batch[column]
        total += int((values[:, 1:] >= 0).sum()) if packed else int(values.sum())
    return total


def write_shard(documents: DatasetDict, column: str, value: object, to_rows: RowBuilder, directory: Path) -> int:
    """Turn the train/validation documents whose ``column`` equals ``value`` into rows, streamed to
    disk, and save them in ``directory``; returns the number of training targets."""
    with tempfile.TemporaryDirectory(dir=Path(directory).parent, prefix=".rows-") as scratch:
        rows = {}
        for name in ("train", "validation"):
            chosen = documents[name].filter(
                lambda values: [v == value for v in values],
                input_columns=column,
                batched=True,
                batch_size=READ_BATCH,
                desc=f"{directory.name}: {name} documents",
            )
            # an empty split cannot round-trip through save_to_disk: a cluster without validation
            # documents gets a train split only
            if len(chosen):
                rows[name] = rows_on_disk(lambda chosen=chosen: to_rows(chosen), scratch)
        shard = DatasetDict(rows)
        save_dataset(shard, directory)
        return training_targets(shard["train"])


#: What training leaves in a run; a new tokenizer and partition would make all of it unusable.
TRAINED = ("seed", "experts", "router", "baseline", "checkpoints", "ensemble.json")


def trained_artifacts(run_dir: str | Path) -> list[str]:
    """The trained artifacts ``run_dir`` already holds (names of TRAINED that exist)."""
    return [name for name in TRAINED if (Path(run_dir) / name).exists()]


def prepare(config: RunConfig, run_dir: str | Path, overwrite: bool = False) -> dict:
    """Load, tokenize, partition and shard the corpus into ``run_dir``; returns a summary.

    The run is written beside ``run_dir`` and replaces it as a whole, so a crash leaves the old run
    or the new one, never a mix. A run that holds trained artifacts is only replaced with ``overwrite``.
    """
    trained = trained_artifacts(run_dir)
    if trained and not overwrite:
        raise DfmError(
            f"{run_dir} already holds trained artifacts ({', '.join(trained)}) that a new tokenizer and "
            f"partition would make unusable: pass --overwrite to replace the whole run, --resume to "
            f"continue it (dfm run), or choose another --out"
        )
    with atomic_dir(run_dir) as tmp:
        return _prepare_into(config, tmp)


def _prepare_into(config: RunConfig, run_dir: Path) -> dict:
    layout = RunLayout.of(run_dir)
    scratch = run_dir / ".scratch"  # streamed datasets and rows; removed before the run is renamed into place
    try:
        return _prepare_steps(config, layout, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _prepare_steps(config: RunConfig, layout: RunLayout, scratch: Path) -> dict:
    corpus = load_corpus(config, scratch)
    text_column = config.data.text_column
    pretrained = config.tokenizer.path or config.seed_model.init_from
    if pretrained:
        tokenizer = existing_tokenizer(pretrained)
    else:
        sample = sample_documents(corpus["train"], config.tokenizer.sample_documents, config.seed)
        tokenizer = train_bpe(text_batches(sample, text_column), config.tokenizer.vocab_size)
    save_tokenizer(tokenizer, layout.tokenizer)
    tokenized = DatasetDict(
        {name: tokenize(split, tokenizer, text_column, config.num_proc) for name, split in corpus.items()}
    )

    vocab_size = len(tokenizer)
    partition = _partition(config, tokenized["train"], vocab_size)
    column = config.data.cluster_column
    if len(partition.assignments) == len(tokenized["train"]):  # fitted on every training document: balanced
        train = tokenized["train"].add_column("cluster", partition.assignments.tolist())
    else:
        train = with_clusters(tokenized["train"], partition, column)
        partition = dataclasses.replace(partition, assignments=column_tensor(train, "cluster"))
    num_clusters = partition.num_clusters
    if num_clusters < 1 or min(partition.sizes) == 0:
        raise DfmError(f"partition has empty clusters (sizes {partition.sizes}): use fewer clusters or more data")
    tokenized = DatasetDict(
        {"train": train, **{name: with_clusters(tokenized[name], partition, column) for name in ("validation", "test")}}
    )
    tokenized = DatasetDict(
        {
            name: split.add_column("shared", shared_flags(split, config)) if name != "test" else split
            for name, split in tokenized.items()
        }
    )

    label_column = config.data.label_column
    labels = list(tokenized["train"][label_column]) if label_column in tokenized["train"].column_names else None
    stats = partition_stats(partition.assignments, labels, num_clusters)
    stats["priors"] = [size / len(tokenized["train"]) for size in stats["sizes"]]
    stats["label_values"] = partition.label_values
    partition.save(layout.partition)
    write_json(layout.partition / "stats.json", stats)
    save_dataset(tokenized, layout.documents)

    to_rows = row_builder(config, tokenizer.eos_token_id, document_bos(tokenizer))
    shard_tokens = [write_shard(tokenized, "cluster", k, to_rows, layout.shard(k)) for k in range(num_clusters)]
    write_shares(layout, shard_tokens)
    if config.seed_model.trained:
        write_shard(tokenized, "shared", True, to_rows, layout.shared)
    config = dataclasses.replace(config, partition=dataclasses.replace(config.partition, num_clusters=num_clusters))
    write_json(layout.config, config.to_dict())
    return {
        "documents": {name: len(split) for name, split in tokenized.items()},
        "vocab_size": vocab_size,
        "clusters": num_clusters,
        "sizes": stats["sizes"],
        "purity": stats["purity"],
        "nmi": stats["nmi"],
        "train_tokens": shard_tokens,
    }
