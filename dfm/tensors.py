"""Small tensor helpers shared by the models and the trainer."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor

from dfm.errors import DfmError


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that ignore left padding: the i-th real token of a row gets position i."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when this machine has it, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``;
    a CUDA device the machine lacks is refused with what to pass instead."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise DfmError(f"--device {name!r} is not a device: pass auto, cpu, cuda or cuda:N") from err
    if device.type not in ("cpu", "cuda"):
        raise DfmError(f"--device {name!r}: dfm runs on auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DfmError(
                f"--device {name}: this machine has no CUDA GPU (or torch was built without CUDA); "
                f"pass --device cpu or auto"
            )
        if device.index is not None and device.index >= count:
            raise DfmError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return device


#: --dtype names: the precision of inference weights (training keeps float32 weights under autocast)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def inference_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` (bfloat16 on CUDA, whose tensor cores run it at full speed; float32 on the CPU), or a
    name of DTYPES."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise DfmError(f"--dtype {name!r}: pass auto, {' or '.join(DTYPES)}")
    return DTYPES[name]


def autocast_for(device: torch.device) -> AbstractContextManager:
    """bf16 autocast on CUDA, nothing on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
