"""FSDP for models that do not fit one device: torch's FSDP2 ``fully_shard`` on every transformer
block and then the whole model, and the full (gathered) state dicts that checkpoints and the final
``save_pretrained`` need.

FSDP2 rather than accelerate: it is torch's own per-parameter sharding (DTensor), composes with
the trainer's loop as it is (no accelerate launcher or config), and its state-dict helpers
gather a full, portable state that every other dfm tool loads.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard

from dfm.errors import DfmError

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_model(model: nn.Module) -> None:
    """``fully_shard`` every block the model names in ``_no_split_modules`` (its transformer
    layers), then the model itself, in place."""
    block_names = {name for module in model.modules() for name in (getattr(module, "_no_split_modules", None) or [])}
    blocks = [module for module in model.modules() if type(module).__name__ in block_names]
    if not blocks:
        raise DfmError(
            f"{type(model).__name__} names no transformer blocks (_no_split_modules) for FSDP to shard: "
            f"train it without fsdp"
        )
    for block in blocks:
        fully_shard(block)
    fully_shard(model)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_states(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model, optimizer) full state dicts on the CPU of rank 0 (empty elsewhere); every rank must call."""
    return get_model_state_dict(model, options=_FULL), get_optimizer_state_dict(model, optimizer, options=_FULL)


def full_model_state(model: nn.Module) -> dict[str, Any]:
    """The model's full state dict on the CPU of rank 0 (empty elsewhere); every rank must call."""
    return get_model_state_dict(model, options=_FULL)


def load_full_states(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any], optimizer_state: dict[str, Any]
) -> None:
    """Load full state dicts (read by every rank) into the sharded model and its optimizer."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def grad_sync(model: nn.Module, enabled: bool) -> None:
    """Whether the next backward reduces gradients across ranks (off for all but the last micro-batch)."""
    model.set_requires_gradient_sync(enabled)
