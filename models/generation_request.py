"""What to generate, as one request both samplers read (models/path_kinds.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dfm.routing import Routing

#: Euler steps of the masked sampler when a request names none.
DEFAULT_SAMPLER_STEPS = 64


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate, on either path. Options a path has no use for must keep their defaults
    (the kind refuses them otherwise, naming the flag)."""

    max_new_tokens: int = 64  # on the masked path: the masked positions filled after the prompt
    routing: Routing = Routing.MIXTURE
    k: int | None = None
    temperature: float = 1.0
    seed: int = 0
    exclude: Sequence[int] = ()
    clusters: Sequence[int] | None = None  # oracle routing: the true cluster of every prompt
    top_p: float = 1.0  # autoregressive only
    top_k: int = 0  # autoregressive only
    route_on: str = "token"  # autoregressive only
    partition: Any = None  # autoregressive centroid routing: the run's Partition
    centroid_temperature: float = 0.1  # autoregressive centroid routing
    sampler_steps: int | None = None  # masked only (default DEFAULT_SAMPLER_STEPS)
