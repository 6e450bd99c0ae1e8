"""Schedulers kappa(t) of a mixture path: the probability that a token is already its clean value at time t.

kappa rises from 0 at t = 0 (all noise) to 1 at t = 1 (clean data); ``d_kappa`` is its time
derivative, which sets the rate at which masked tokens are revealed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from dfm.errors import DfmError


class Scheduler(Protocol):
    def kappa(self, t: Tensor) -> Tensor: ...

    def d_kappa(self, t: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class PolynomialScheduler:
    """kappa(t) = t ** exponent (exponent 1: the linear scheduler)."""

    exponent: float = 1.0

    def kappa(self, t: Tensor) -> Tensor:
        return t**self.exponent

    def d_kappa(self, t: Tensor) -> Tensor:
        return self.exponent * t ** (self.exponent - 1)


@dataclass(frozen=True)
class CosineScheduler:
    """kappa(t) = 1 - cos(pi t / 2): slow reveals first, fast at the end."""

    def kappa(self, t: Tensor) -> Tensor:
        return 1 - torch.cos(0.5 * math.pi * t)

    def d_kappa(self, t: Tensor) -> Tensor:
        return 0.5 * math.pi * torch.sin(0.5 * math.pi * t)


SCHEDULERS: dict[str, Scheduler] = {"linear": PolynomialScheduler(1.0), "cosine": CosineScheduler()}


def scheduler(name: str) -> Scheduler:
    """The scheduler called ``name`` (one of SCHEDULERS)."""
    if not isinstance(name, str) or name not in SCHEDULERS:
        raise DfmError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    return SCHEDULERS[name]
