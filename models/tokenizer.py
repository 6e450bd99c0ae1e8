"""Loading a run's saved tokenizer (trained by training/tokenizer_training.py, saved with save_pretrained)."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from dfm.errors import DfmError


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in ``path``; damaged files are a DfmError naming the first unparsable one."""
    if not path.is_dir():
        raise DfmError(f"tokenizer directory {path} is missing: run `dfm prepare` or pass --tokenizer")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as err:  # tokenizers and transformers raise many types (even Exception) on damaged files
        damaged = next((f for f in sorted(path.glob("*.json")) if not _parses(f)), path)
        detail = str(err).splitlines()[0] if str(err) else "no details"
        raise DfmError(
            f"cannot load the tokenizer: {damaged} is damaged ({type(err).__name__}: {detail}); re-copy "
            f"{path} from an intact copy (a new one from `dfm prepare` means retraining every model)"
        ) from err


def _parses(path: Path) -> bool:
    try:
        json.loads(path.read_text())
        return True
    except (OSError, ValueError):
        return False
