"""The shared tokenizer: byte-level BPE trained with `tokenizers`, saved as PreTrainedTokenizerFast."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from dfm.atomic import atomic_dir
from dfm.errors import DfmError
from dfm.progress import shown
from models.tokenizer import load_tokenizer
from training.data import as_texts

#: One special token serves as document separator, BOS, EOS and padding (GPT-2 style).
END_OF_TEXT = "<|endoftext|>"


class VocabularyShortfall(UserWarning):
    """BPE reached fewer tokens than asked: the corpus ran out of frequent pairs (harmless; the run
    uses the smaller vocabulary). ``dfm`` shows it only when the vocabulary size was set explicitly."""


def train_bpe(
    texts: Iterable[str] | Iterable[list[str]], vocab_size: int = 2048, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` (strings, or batches of them); every byte stays
    encodable. Warns (VocabularyShortfall) when the corpus cannot fill ``vocab_size``."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise DfmError(f"vocab size {vocab_size} is too small for byte-level BPE: use at least {len(alphabet) + 1}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=shown(),
        special_tokens=[END_OF_TEXT],
        initial_alphabet=alphabet,
    )
    bpe.train_from_iterator(texts, trainer)
    reached = bpe.get_vocab_size()
    if reached < vocab_size:
        warnings.warn(
            VocabularyShortfall(
                f"the BPE tokenizer stopped at {reached} tokens of the {vocab_size} asked (tokenizer.vocab_size): the "
                f"corpus has no more pairs seen {min_frequency}+ times; the run uses {reached} (more text reaches more)"
            ),
            stacklevel=2,
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        unk_token=None,
        model_max_length=1 << 30,
    )


def text_batches(ds: Dataset, text_column: str, batch_size: int = 1000) -> Iterator[list[str]]:
    """The texts of ``ds`` in batches, for ``train_bpe`` (a missing or non-string text reads as "")."""
    for batch in ds.select_columns([text_column]).iter(batch_size=batch_size):
        yield as_texts(batch[text_column])


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: str | os.PathLike) -> None:
    with atomic_dir(directory) as tmp:
        tokenizer.save_pretrained(tmp)


def existing_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The tokenizer of --tokenizer or --init-from (a local directory or a hub name); it needs an
    EOS token to separate documents."""
    if Path(path).is_dir():
        tokenizer = load_tokenizer(Path(path))
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        except (OSError, ValueError) as err:
            raise DfmError(
                f"cannot load a tokenizer from {str(path)!r} ({str(err).splitlines()[0]}): give "
                f"--init-from/--tokenizer a local save_pretrained directory or a hub name"
            ) from err
    if tokenizer.eos_token_id is None:
        raise DfmError(f"the tokenizer at {path} has no EOS token: dfm needs one to separate documents")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
