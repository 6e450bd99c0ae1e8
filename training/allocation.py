"""How the branch phase's optimizer steps are split between the experts (``expert.allocation``).

``equal``: every expert trains ``expert.train.steps``. ``tokens``: the same total, K x steps, split
in proportion to each shard's training tokens, as the baseline spreads its steps over the union of
the shards; on unbalanced clusters an equal split starves the big ones. The shares are written
beside each shard by `dfm prepare`, so an expert on a compute island needs nothing more than its
shard to know its steps.
"""

from __future__ import annotations

import json

from dfm.atomic import write_json
from dfm.errors import DfmError
from training.layout import RunLayout
from training.run_config import RunConfig

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


def expert_steps(config: RunConfig, layout: RunLayout, k: int) -> int:
    """The optimizer steps of expert k under ``config.expert.allocation``."""
    steps = config.expert.train["steps"]
    if config.expert.allocation == "equal":
        return steps
    share = read_share(layout, k)
    if share is None:
        raise DfmError(
            f"{layout.shard(k) / SHARE_FILE} not found: expert.allocation=tokens needs the token shares that "
            f"`dfm prepare` writes beside each shard; prepare the run again, or --set expert.allocation=equal"
        )
    return max(1, round(share["clusters"] * steps * share["targets"] / share["all_targets"]))
