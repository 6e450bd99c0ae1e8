"""How many optimizer steps each expert trains (``expert.allocation``, ``expert.epochs``).

``equal``: every expert trains ``expert.train.steps``. ``tokens``: the same total, K x steps, split
in proportion to each shard's training tokens, as the baseline spreads its steps over the union of
the shards; on unbalanced clusters an equal split starves the big ones. The shares are written
beside each shard by `dfm prepare`, so an expert on a compute island needs nothing more than its
shard to know its steps. ``expert.epochs`` (and ``seed_model.epochs`` for the seed phase) sizes the
steps to the data instead: that many passes over the model's own training blocks.
"""

from __future__ import annotations

import json
import math

from dfm.atomic import write_json
from dfm.errors import DfmError
from training.data import load_saved
from training.layout import RunLayout
from training.run_config import RunConfig
from training.trainer import TrainConfig

SHARE_FILE = "share.json"


def write_share(layout: RunLayout, k: int, targets: int, all_targets: int, clusters: int) -> None:
    """Record beside shard k its training tokens and those of all ``clusters`` shards."""
    write_json(layout.shard(k) / SHARE_FILE, {"targets": targets, "all_targets": all_targets, "clusters": clusters})


def write_shares(layout: RunLayout, targets: list[int]) -> None:
    """The shares of a freshly prepared run, ``targets[k]`` the training tokens of shard k."""
    for k, count in enumerate(targets):
        write_share(layout, k, count, sum(targets), len(targets))


def read_share(layout: RunLayout, k: int) -> dict | None:
    path = layout.shard(k) / SHARE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def epoch_steps(epochs: float, blocks: int, train: dict, world_size: int = 1) -> int:
    """The optimizer steps that read ``blocks`` training rows ``epochs`` times, ``train``'s
    batch_size x grad_accum rows per step on each of ``world_size`` processes (at least one)."""
    rows = train["batch_size"] * train.get("grad_accum", 1) * world_size
    return max(1, math.ceil(round(epochs * blocks / rows, 9)))  # 1.1 x 400 / 8 is 55, not 55.000...01


def with_steps(train: dict, steps: int) -> dict:
    """``train`` with ``steps``; the warm-up shortened to fit when the steps are fewer."""
    warmup = min(train.get("warmup_steps", TrainConfig.warmup_steps), steps - 1)
    return {**train, "steps": steps, "warmup_steps": warmup}


def seed_train(config: RunConfig, blocks: int, world_size: int = 1) -> dict:
    """The seed phase's training options: ``seed_model.train``, or its ``epochs`` over ``blocks`` rows."""
    train = config.seed_model.train
    if config.seed_model.epochs is None:
        return train
    return with_steps(train, epoch_steps(config.seed_model.epochs, blocks, train, world_size))


def expert_train(config: RunConfig, layout: RunLayout, k: int, world_size: int = 1) -> dict:
    """Expert k's training options: ``expert.train`` with the steps ``expert_steps`` gives it."""
    steps = expert_steps(config, layout, k, world_size)
    train = config.expert.train
    return with_steps(train, steps) if config.expert.epochs is not None else {**train, "steps": steps}


def expert_steps(config: RunConfig, layout: RunLayout, k: int, world_size: int = 1) -> int:
    """The optimizer steps of expert k under ``config.expert.epochs`` or ``config.expert.allocation``."""
    steps = config.expert.train["steps"]
    if config.expert.epochs is not None:
        blocks = load_saved(layout.shard(k), f"the data shard of expert {k}")["train"].num_rows
        return epoch_steps(config.expert.epochs, blocks, config.expert.train, world_size)
    if config.expert.allocation == "equal":
        return steps
    share = read_share(layout, k)
    if share is None:
        raise DfmError(
            f"{layout.shard(k) / SHARE_FILE} not found: expert.allocation=tokens needs the token shares that "
            f"`dfm prepare` writes beside each shard; prepare the run again, or --set expert.allocation=equal"
        )
    return max(1, round(share["clusters"] * steps * share["targets"] / share["all_targets"]))
