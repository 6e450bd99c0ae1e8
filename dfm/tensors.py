"""Small tensor helpers shared by the models and the trainer."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that ignore left padding: the i-th real token of a row gets position i."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def autocast_for(device: torch.device) -> AbstractContextManager:
    """bf16 autocast on CUDA, nothing on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
