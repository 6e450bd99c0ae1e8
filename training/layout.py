"""Where every artifact of a run lives (README, "Run directory")."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @classmethod
    def of(cls, run_dir: str | os.PathLike) -> RunLayout:
        return cls(Path(run_dir))

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def partition(self) -> Path:
        return self.root / "partition"

    @property
    def documents(self) -> Path:
        """Tokenized documents of every split with their cluster (router training, evaluation)."""
        return self.root / "data" / "documents"

    def shard(self, k: int) -> Path:
        """Packed train/validation blocks of cluster k: all an expert needs besides the tokenizer."""
        return self.root / "data" / f"expert-{k}"

    @property
    def shared(self) -> Path:
        """Packed blocks of the shareable documents of every cluster: the seed model's data."""
        return self.root / "data" / "shared"

    @property
    def seed_model(self) -> Path:
        """The seed model every expert and the baseline branch from (save_pretrained)."""
        return self.root / "seed"

    def expert(self, k: int) -> Path:
        return self.root / "experts" / f"expert-{k}"

    @property
    def router(self) -> Path:
        return self.root / "router"

    @property
    def baseline(self) -> Path:
        return self.root / "baseline"

    def checkpoints(self, name: str) -> Path:
        return self.root / "checkpoints" / name

    @property
    def timings(self) -> Path:
        """Seconds per stage of `dfm run`."""
        return self.root / "logs" / "timings.json"

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.jsonl"

    def summary(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.summary.json"

    def read_summary(self, name: str) -> dict | None:
        """What the trainer of ``name`` summarised (steps, tokens, FLOPs, ...), or None before it finished."""
        path = self.summary(name)
        return json.loads(path.read_text()) if path.is_file() else None

    @property
    def eval(self) -> Path:
        return self.root / "eval"
