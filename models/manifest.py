"""ensemble.json: which experts, priors, router and tokenizer make up an ensemble."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dfm.atomic import write_json
from dfm.errors import DfmError

FORMAT_VERSION = 1
MANIFEST = "ensemble.json"


def tokenizer_fingerprint(vocab: dict[str, int]) -> str:
    """sha256 of the token -> id table: two tokenizers with the same fingerprint encode alike."""
    canonical = json.dumps(sorted(vocab.items(), key=lambda item: item[1]), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass
class ExpertEntry:
    name: str
    path: str      # relative to the run directory
    prior: float   # cluster share pi_k


@dataclass
class Manifest:
    experts: list[ExpertEntry]
    tokenizer: str
    tokenizer_fingerprint: str
    vocab_size: int
    router: str | None = None
    partition: str | None = None
    baseline: str | None = None
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    @property
    def path_kind(self) -> str:
        """The probability path the run's models were trained on: "ar" or "masked"."""
        return self.extra.get("path", {}).get("kind", "ar")

    def save(self, run_dir: str | os.PathLike) -> Path:
        path = Path(run_dir) / MANIFEST
        write_json(path, asdict(self))
        return path

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> Manifest:
        path = Path(run_dir) / MANIFEST
        if not Path(run_dir).is_dir():
            raise DfmError(f"run directory {run_dir} does not exist: run `dfm run --out {run_dir}` first")
        if not path.is_file():
            raise DfmError(f"{path} is missing: run `dfm assemble --run {run_dir}` after training the experts")
        try:
            raw = json.loads(path.read_text())
            version = raw.get("format_version")
            if version != FORMAT_VERSION:
                raise DfmError(f"{path} has format version {version}, this dfm reads version {FORMAT_VERSION}: "
                               f"re-run `dfm assemble --run {run_dir}` with this version")
            raw["experts"] = [ExpertEntry(**e) for e in raw["experts"]]
            return cls(**raw)
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as err:
            raise DfmError(f"{path} is corrupt ({err}); re-run `dfm assemble --run {run_dir}`") from err


def resolve_inside(run_dir: str | os.PathLike, relative: str) -> Path:
    """``run_dir / relative``, refusing paths that escape the run directory."""
    root = Path(run_dir).resolve()
    target = (root / relative).resolve()
    if not target.is_relative_to(root):
        raise DfmError(f"path {relative!r} in {MANIFEST} points outside the run directory {root}; fix the manifest")
    return target
