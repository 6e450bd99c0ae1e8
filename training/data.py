"""Corpora from Hugging Face datasets: loading, splitting, tokenizing and packing into blocks."""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase

from dfm.atomic import atomic_dir
from dfm.errors import DfmError

LOCAL_FORMATS = ("json", "csv", "parquet", "text")
#: Documents read at a time by the streaming passes of ``dfm prepare``.
READ_BATCH = 1000
SPLITS = ("train", "validation", "test")


@dataclass
class DataSource:
    """Where the documents come from. ``dataset`` is a hub name, a local format with
    ``data_files``, or a directory written by ``save_to_disk``; None means the synthetic corpus."""

    dataset: str | None = None
    config_name: str | None = None
    split: str | None = None
    data_files: list[str] | dict[str, list[str]] | None = None  # a dict maps split names to files
    text_column: str = "text"
    streaming: bool = False
    max_documents: int | None = None
    validation_fraction: float = 0.05
    test_fraction: float = 0.05
    seed: int = 0


def load_documents(source: DataSource, scratch: str | os.PathLike | None = None) -> DatasetDict:
    """Load the corpus as train/validation/test splits with ``source.text_column`` present. A
    streamed dataset is written to disk under ``scratch`` (default: a new temporary directory,
    made only then) as it is read, so a corpus larger than memory never becomes a Python list."""
    raw = _load_raw(source)
    if not isinstance(raw, dict):
        raw = {"train": raw}
    splits = {name: _materialize(ds, source.max_documents, scratch) for name, ds in raw.items()}
    if "train" not in splits:
        raise DfmError(f"the dataset has splits {sorted(splits)} but no 'train': name one with --train-split")
    for name, ds in splits.items():
        if source.text_column not in ds.column_names:
            raise DfmError(
                f"split {name!r} has no column {source.text_column!r} (columns: {ds.column_names}): pass --text-column"
            )
        _check_texts(ds, source.text_column, name)
    if len(splits["train"]) == 0:
        raise DfmError("the training split is empty: check --dataset/--data-files/--train-split")
    aliases = {"valid": "validation", "dev": "validation"}
    splits = {aliases.get(name, name): ds for name, ds in splits.items()}
    return DatasetDict(carve_splits(splits, source))


def _load_raw(source: DataSource):
    name = source.dataset
    try:
        if name is not None and Path(name).is_dir() and _is_saved_dataset(Path(name)):
            loaded = datasets.load_from_disk(name)
            return loaded[source.split] if source.split else loaded
        if name in LOCAL_FORMATS:
            if not source.data_files:
                raise DfmError(f"--dataset {name} reads local files: pass --data-files PATH [PATH ...]")
            files = (
                [f for group in source.data_files.values() for f in group]
                if isinstance(source.data_files, dict)
                else source.data_files
            )
            missing = [f for f in files if not glob.glob(f)]
            if missing:
                raise DfmError(f"data file(s) not found: {', '.join(missing)}")
            if all(os.path.getsize(p) == 0 for f in files for p in glob.glob(f)):
                raise DfmError(f"the data files are empty: {', '.join(files)}")
        return datasets.load_dataset(
            name, source.config_name, split=source.split, data_files=source.data_files, streaming=source.streaming
        )
    except DfmError:
        raise
    except FileNotFoundError as err:
        raise DfmError(f"dataset {name!r} not found ({_first_line(err)}): check the name or path") from err
    except ConnectionError as err:
        raise DfmError(
            f"cannot reach the hub for {name!r} (offline?): use local files with --dataset json --data-files ..."
        ) from err
    except Exception as err:  # datasets raises many types for unreadable input; name the root cause
        cause = _root_cause(err)
        if isinstance(cause, UnicodeDecodeError):
            raise DfmError(
                f"dataset {name!r} is not valid UTF-8 ({cause.reason} at byte {cause.start}): "
                f"re-encode the files as UTF-8, e.g. iconv -f latin1 -t utf-8"
            ) from err
        raise DfmError(f"cannot read dataset {name!r}: {type(cause).__name__}: {_first_line(cause)}") from err


def _check_texts(ds: Dataset, column: str, split: str) -> None:
    """Refuse a text column with values that are not text (null, numbers): such rows are refused, not
    skipped, since an empty document would still count in the clusters' sizes and priors. A string
    column's nulls are counted from Arrow batches, without reading the texts into Python."""
    columns = ds.select_columns([column])
    if getattr(ds.features[column], "dtype", None) in ("string", "large_string"):
        bad = sum(batch.column(column).null_count for batch in columns.with_format("arrow").iter(batch_size=READ_BATCH))
    else:
        bad = sum(not isinstance(v, str) for batch in columns.iter(batch_size=READ_BATCH) for v in batch[column])
    if bad:
        raise DfmError(
            f"column {column!r} of split {split!r} has {bad} of {len(ds)} rows whose value is null or not "
            f"a string: drop those rows from the data, or pass --text-column naming the column of the text"
        )


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return err


def _first_line(err: BaseException) -> str:
    text = str(err)
    return text.splitlines()[0] if text else "no details"


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def _materialize(ds, max_documents: int | None, scratch: str | os.PathLike | None) -> Dataset:
    """A streamed split is written to disk under ``scratch`` (up to ``max_documents``); a regular one is capped."""
    if isinstance(ds, datasets.IterableDataset):
        stream = ds if max_documents is None else ds.take(max_documents)
        directory = scratch if scratch is not None else tempfile.mkdtemp(prefix="dfm-stream-")
        return rows_on_disk(lambda: iter(stream), directory)
    if max_documents is not None and len(ds) > max_documents:
        return ds.select(range(max_documents))
    return ds


def carve_splits(splits: dict[str, Dataset], source: DataSource) -> dict[str, Dataset]:
    """Take validation/test from train, deterministically by document, when the dataset lacks them."""
    missing = [name for name in ("validation", "test") if name not in splits]
    if not missing:
        return {name: splits[name] for name in SPLITS}
    fractions = {"validation": source.validation_fraction, "test": source.test_fraction}
    train = splits["train"].shuffle(seed=source.seed)
    n = len(train)
    sizes = {name: max(1, round(n * fractions[name])) for name in missing}
    if sum(sizes.values()) >= n:
        raise DfmError(f"only {n} training documents: too few to carve validation/test splits; add documents")
    out, start = dict(splits), 0
    for name in missing:
        out[name] = train.select(range(start, start + sizes[name]))
        start += sizes[name]
    out["train"] = train.select(range(start, n))
    return {name: out[name] for name in SPLITS}


def as_texts(values: list) -> list[str]:
    """Text column values as strings: a missing or non-string value reads as ""."""
    return [value if isinstance(value, str) else "" for value in values]


def tokenize(ds: Dataset, tokenizer: PreTrainedTokenizerBase, text_column: str, num_proc: int | None = None) -> Dataset:
    """Add ``input_ids`` (no special tokens) and ``num_bytes`` (UTF-8 length) to every document."""

    def encode(batch: dict) -> dict:
        texts = as_texts(batch[text_column])
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return {"input_ids": ids, "num_bytes": [len(t.encode("utf-8")) for t in texts]}

    return ds.map(encode, batched=True, num_proc=num_proc, desc="tokenize")


def packed_rows(ds: Dataset, block_size: int, eos_id: int, bos_id: int | None = None) -> Iterator[dict]:
    """Blocks for causal-LM training, packing the documents of ``ds`` and keeping every token exactly once.

    Every document is read from its BOS and ends in its EOS. With one token for both (``bos_id``
    None or ``eos_id``: dfm's own tokenizer, GPT-2's) the stream is EOS doc_1 EOS doc_2 EOS ...,
    each document following an EOS, its BOS. With a BOS of its own (Llama, Mistral) it is BOS
    doc_1 EOS BOS doc_2 EOS ..., and a BOS is never a target (it would be predicted from the
    previous document's end). Blocks overlap by one token so every other token after the first
    BOS is a prediction target exactly once; ``labels`` is -100 on the padding of the last block.
    Documents are read in batches and blocks yielded as they fill, so memory holds one batch of
    the stream, never the corpus.

    ``position_ids`` restart at 0 at every BOS and at every block start. Given to a Hugging Face
    model without an attention mask or cache, positions that restart make its attention
    block-diagonal (transformers' packed-sequence masking): no document attends to another, and
    each is read from position 0 as evaluation and generation read it.
    """
    if block_size < 2:
        raise DfmError("block size must be at least 2")
    bos_id = eos_id if bos_id is None else bos_id
    step = block_size - 1

    def block(chunk: list[int]) -> dict:
        pad = block_size - len(chunk)
        labels = chunk if bos_id == eos_id else [-100 if t == bos_id else t for t in chunk]
        ids = chunk + [eos_id] * pad
        return {"input_ids": ids, "labels": labels + [-100] * pad, "position_ids": document_positions(ids, bos_id)}

    stream, start, opened = [], 0, False
    for batch in ds.select_columns(["input_ids"]).iter(batch_size=READ_BATCH):
        for ids in batch["input_ids"]:
            if bos_id != eos_id or not opened:  # one shared token: the previous EOS is this document's BOS
                stream.append(bos_id)
                opened = True
            stream.extend(ids)
            stream.append(eos_id)
        while len(stream) - start >= block_size:
            yield block(stream[start : start + block_size])
            start += step
        del stream[:start]
        start = 0
    while len(stream) - start > 1:
        yield block(stream[start : start + block_size])
        start += step


def pack_blocks(ds: Dataset, block_size: int, eos_id: int, bos_id: int | None = None) -> Dataset:
    """``packed_rows`` collected into an in-memory dataset (for small inputs; ``rows_on_disk`` streams)."""
    return Dataset.from_list(list(packed_rows(ds, block_size, eos_id, bos_id)))


def rows_on_disk(rows: Callable[[], Iterator[dict]], scratch: str | os.PathLike) -> Dataset:
    """A memory-mapped dataset of the rows ``rows()`` yields, written to a new directory under
    ``scratch`` as they come (datasets' generator builder), so no list of all rows is ever held."""
    Path(scratch).mkdir(parents=True, exist_ok=True)
    # a fresh cache directory per call: the builder reuses any earlier output of the same fingerprint
    return Dataset.from_generator(rows, cache_dir=tempfile.mkdtemp(dir=scratch), fingerprint="rows")


def sample_documents(ds: Dataset, count: int | None, seed: int) -> Dataset:
    """At most ``count`` documents of ``ds`` in their order, chosen by a seeded draw (all of them when
    ``ds`` has no more than ``count``): what the tokenizer and the partition are fitted on."""
    if count is None or len(ds) <= count:
        return ds
    chosen = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:count]
    return ds.select(chosen.sort().values.tolist())


def column_tensor(ds: Dataset, column: str) -> torch.Tensor:
    """One numeric column of ``ds`` as a tensor, read batch by batch (no Python list of it)."""
    parts = [
        torch.as_tensor(batch[column])
        for batch in ds.select_columns([column]).with_format("numpy").iter(batch_size=1 << 16)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def document_positions(ids: list[int], bos_id: int) -> list[int]:
    """Position of every token within its document: 0 at the block start and at each BOS."""
    out, position = [], 0
    for i, token in enumerate(ids):
        position = 0 if i == 0 or token == bos_id else position + 1
        out.append(position)
    return out


def save_dataset(ds: Dataset | DatasetDict, directory: str | os.PathLike) -> None:
    """save_to_disk into a temporary directory, then rename into place."""
    with atomic_dir(directory) as tmp:
        ds.save_to_disk(str(tmp))


def load_saved(directory: str | os.PathLike, what: str, fix: str = "run `dfm prepare` first") -> Dataset | DatasetDict:
    """A dataset saved by ``save_dataset``; a missing one is a DfmError that says ``fix``."""
    path = Path(directory)
    if not path.is_dir():
        raise DfmError(f"{what} not found at {path}: {fix}")
    return datasets.load_from_disk(str(path))


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
