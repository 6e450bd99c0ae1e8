"""Where every model of a run starts, decided in one place: the seed model from the pretrained
``seed_model.init_from`` or from scratch; experts and the baseline from the branch point (RUN/seed
after a seed phase, else ``init_from``, else scratch); and the network built or loaded there."""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from dfm.errors import DfmError
from models.expert import branch_from, build_expert, expert_config
from models.manifest import tokenizer_fingerprint
from models.masked_expert import build_masked_expert, load_masked_expert, masked_expert_config
from models.scoring import document_bos
from training.config import is_masked, seed_phase
from training.layout import RunLayout


def start_of(run_dir: str | Path, config: dict, name: str) -> str | Path | None:
    """Where the model ``name`` (seed, expert-K, baseline) starts: a directory or hub name, or None
    for a fresh network."""
    return config["seed_model"]["init_from"] if name == "seed" else branch_point(run_dir, config)


def initial_model(config: dict, tokenizer: PreTrainedTokenizerBase, seed: int, init: str | Path | None) -> nn.Module:
    """A fresh network of ``expert.arch`` (init None), or a branch of the seed model at ``init``."""
    fingerprint = tokenizer_fingerprint(tokenizer.get_vocab())
    if is_masked(config):
        if init is not None:
            return load_masked_expert(init)
        return build_masked_expert(
            masked_expert_config(
                len(tokenizer),
                eos_token_id=tokenizer.eos_token_id,
                tokenizer_fingerprint=fingerprint,
                arch=config["expert"]["arch"],
            ),
            seed=seed,
        )
    fields = {
        "bos_token_id": document_bos(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "tokenizer_fingerprint": fingerprint,
    }
    if init is not None:
        return branch_from(init, vocab_size=len(tokenizer), **fields)
    return build_expert(expert_config(len(tokenizer), arch=config["expert"]["arch"], **fields), seed=seed)


def branch_point(run_dir: str | Path, config: dict) -> str | Path | None:
    """Where experts and the baseline start: RUN/seed after a seed phase, else the pretrained
    ``seed_model.init_from``, else None (from scratch)."""
    if seed_phase(config):
        seed = RunLayout.of(run_dir).seed
        if not (seed / "config.json").is_file():
            raise DfmError(
                f"the seed model is missing at {seed}: run `dfm train-seed-model --run {run_dir}` first "
                f"(a compute island needs RUN/seed too)"
            )
        return seed
    return config["seed_model"]["init_from"]


def run_relative(init: str | Path | None, run_dir: Path) -> str | None:
    """The branch point as a run-relative path (RUN/seed -> "seed"), a hub name, or None."""
    if init is None:
        return None
    return str(Path(init).relative_to(run_dir)) if Path(init).is_relative_to(run_dir) else str(init)
