"""The probability path of a run as one object, chosen once from its configuration (``path.kind``).

A path kind owns what differs between paths: the expert it builds, branches and loads, the loss
it trains with, what its router reads and how large a vocabulary that is, the ensemble it loads,
and its sampler behind one text-generation call (``generate``). Everything else (the trainer,
the pipeline, evaluation, the CLI) asks the kind instead of branching on the path's name.

Two kinds exist: ``ar`` (models/ar_kind.py: next-token causal experts, one-token decoding) and
``masked`` (models/masked_kind.py: the absorbing any-order path, bidirectional experts, an
N-step Euler sampler). A third is one module implementing ``PathKind`` plus one line in ``KINDS``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Sequence
from typing import Any, Protocol

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from dfm.errors import DfmError
from dfm.loss import LossFn
from models.ar_kind import AR
from models.generation_request import GenerationRequest
from models.masked_kind import MASKED


class PathKind(Protocol):
    """The path-specific half of a run (module docstring)."""

    name: str  # "ar" or "masked": config path.kind, ensemble.json's path
    eval_modes: tuple[str, ...]  # the modes `dfm eval` scores on this path
    default_arch: dict[str, Any]  # expert.arch when the configuration names none
    model_family: str  # what its experts are, in words ("causal LM")
    generate_hint: str  # `dfm generate` options worth trying on a run of this path
    streams_tokens: bool  # generate's on_progress gets each new token (else each sampler step's texts)

    def model_types(self) -> Collection[str]:
        """The Hugging Face model types an expert of this path may have."""
        ...

    def initial_model(
        self, arch: dict[str, Any], tokenizer: PreTrainedTokenizerBase, seed: int, init: str | os.PathLike | None
    ) -> nn.Module:
        """A fresh expert of the architecture ``arch`` (``init`` None), or one that starts from the
        model at ``init``."""
        ...

    def load_expert(
        self, path: str | os.PathLike, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> nn.Module:
        """A trained expert saved with save_pretrained."""
        ...

    def loss(self, scheduler_name: str, vocab_size: int) -> LossFn:
        """The loss every language model of the run (seed model, experts, baseline) trains with, on
        the path of the scheduler ``scheduler_name`` (``path.scheduler``) over ``vocab_size`` tokens."""
        ...

    def router_vocab_size(self, vocab_size: int) -> int:
        """The vocabulary of what the router reads: the tokenizer's, plus the mask on the masked path."""
        ...

    def load_ensemble(
        self,
        run_dir: str | os.PathLike,
        device: torch.device | str | None = None,
        *,
        allow_missing: bool = False,
        load_router: bool = True,
        dtype: torch.dtype | None = None,
    ) -> Any:
        """The run's experts, router, priors and tokenizer as this path's ensemble."""
        ...

    def generate(
        self,
        ensemble: Any,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        request: GenerationRequest,
        on_progress: Callable[[int, list], None] | None = None,
    ) -> Any:
        """Continue every prompt with the ensemble's sampler; the result has ``texts``, ``token_ids``,
        ``prompt_ids``, ``names`` and ``to_json()``. ``on_progress(step, items)``: each new token of
        every row (ar) or every step's partly revealed texts (masked)."""
        ...

    def single(self, ensemble: Any, index: int) -> Any:
        """The ensemble's expert ``index`` alone, as a one-expert ensemble of this path."""
        ...


#: Every path kind by name.
KINDS: dict[str, PathKind] = {AR.name: AR, MASKED.name: MASKED}


def path_kind(name: str) -> PathKind:
    """The path kind called ``name``."""
    if name not in KINDS:
        raise DfmError(f"unknown path kind {name!r}: choose one of {', '.join(sorted(KINDS))} (config path.kind)")
    return KINDS[name]
