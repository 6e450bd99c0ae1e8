"""Where every model of a run starts, decided in one place: the seed model from the pretrained
``seed_model.init_from`` or from scratch; experts and the baseline from the branch point (RUN/seed
after a seed phase, else ``init_from``, else scratch). ``initial_model`` builds or loads the network
there, through the run's path kind."""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from dfm.errors import DfmError
from training.layout import RunLayout
from training.run_config import RunConfig


def initial_model(
    run_dir: str | Path, config: RunConfig, tokenizer: PreTrainedTokenizerBase, name: str, seed: int
) -> tuple[nn.Module, str | Path | None]:
    """The network the model ``name`` (seed, expert-K, baseline) starts training as, and where it
    starts from (``start_of``)."""
    init = start_of(run_dir, config, name)
    return config.kind.initial_model(config.expert.arch, tokenizer, seed, init), init


def start_of(run_dir: str | Path, config: RunConfig, name: str) -> str | Path | None:
    """Where the model ``name`` (seed, expert-K, baseline) starts: a directory or hub name, or None
    for a fresh network."""
    return config.seed_model.init_from if name == "seed" else branch_point(run_dir, config)


def branch_point(run_dir: str | Path, config: RunConfig) -> str | Path | None:
    """Where experts and the baseline start: RUN/seed after a seed phase, else the pretrained
    ``seed_model.init_from``, else None (from scratch)."""
    if config.seed_model.trained:
        seed_model = RunLayout.of(run_dir).seed_model
        if not (seed_model / "config.json").is_file():
            raise DfmError(
                f"the seed model is missing at {seed_model}: run `dfm train-seed-model --run {run_dir}` first "
                f"(a compute island needs RUN/seed too)"
            )
        return seed_model
    return config.seed_model.init_from


def run_relative(init: str | Path | None, run_dir: Path) -> str | None:
    """The branch point as a run-relative path (RUN/seed -> "seed"), a hub name, or None."""
    if init is None:
        return None
    return str(Path(init).relative_to(run_dir)) if Path(init).is_relative_to(run_dir) else str(init)
