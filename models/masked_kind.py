"""The masked path (``path.kind=masked``): the absorbing any-order path of DFM, bidirectional experts
trained on its ELBO, a router that reads noisy states X_t, and the N-step Euler sampler
(models/path_kinds.py)."""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase
from transformers.models.auto import modeling_auto

from dfm.errors import DfmError
from dfm.loss import LossFn, masked_dfm_loss
from dfm.masked_path import MaskedPath
from dfm.schedulers import scheduler
from models.generation_request import DEFAULT_SAMPLER_STEPS, GenerationRequest
from models.manifest import tokenizer_fingerprint
from models.masked_ensemble import MaskedEnsemble
from models.masked_expert import (
    DEFAULT_MASKED_ARCH,
    build_masked_expert,
    clean_logits,
    load_masked_expert,
    masked_expert_config,
)
from models.masked_generation import MaskedGeneration, generate_masked_text
from models.router import state_logits

#: The modes `dfm eval` scores on a masked run: bayes and centroid need a prefix likelihood.
MASKED_MODES = ("mixture", "top1", "top2", "switch", "oracle")


def run_path(scheduler_name: str, vocab_size: int) -> MaskedPath:
    """The masked path of a run (``path.scheduler``) over the tokenizer's ``vocab_size`` tokens
    (mask id = vocab_size)."""
    return MaskedPath(vocab_size, scheduler(scheduler_name))


def _noisy_state(path: MaskedPath, x1: Tensor, attention: Tensor) -> tuple[Tensor, Tensor]:
    """(X_t, t) for rows ``x1`` at t ~ U[0, 1) per row, from torch's global generator; padding never masked."""
    t = torch.rand(x1.shape[0], dtype=torch.float64).to(x1.device)
    return torch.where(attention.bool(), path.sample(x1, t), x1), t


def masked_loss(path: MaskedPath) -> LossFn:
    """The loss the trainer minimises for a masked expert: t ~ U[0, 1) per row, X_t from the path
    (padding never masked), and the ELBO per real token. Randomness comes from torch's global
    generator, which the trainer seeds and checkpoints, so runs and resumes are reproducible."""

    def loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        x1, attention = batch["input_ids"], batch["attention_mask"]
        xt, t = _noisy_state(path, x1, attention)
        return masked_dfm_loss(clean_logits(model, xt, attention), x1, xt, t, path, attention)

    return loss


def noisy_router_loss(path: MaskedPath) -> LossFn:
    """Cross-entropy of the router's P(k | X_t) against the row's cluster, X_t drawn from the path at
    t ~ U[0, 1) (the router of Decentralized Diffusion Models). The router reads X_t causally; its
    output at the last real token has seen the whole state."""

    def loss(router: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        x1, attention = batch["input_ids"], batch["attention_mask"]
        xt, _ = _noisy_state(path, x1, attention)
        return torch.nn.functional.cross_entropy(state_logits(router, xt, attention).float(), batch["cluster"])

    return loss


class MaskedKind:
    """``PathKind`` of the masked path."""

    name = "masked"
    eval_modes = MASKED_MODES
    default_arch = DEFAULT_MASKED_ARCH
    model_family = "masked LM (bidirectional)"
    streams_tokens = False
    generate_hint = "switch --sampler-steps 128 --show-steps"

    def model_types(self) -> Collection[str]:
        return modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES

    def initial_model(
        self, arch: dict[str, Any], tokenizer: PreTrainedTokenizerBase, seed: int, init: str | os.PathLike | None
    ) -> nn.Module:
        if init is not None:
            return load_masked_expert(init)
        expert = masked_expert_config(
            len(tokenizer),
            eos_token_id=tokenizer.eos_token_id,
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer.get_vocab()),
            arch=arch,
        )
        return build_masked_expert(expert, seed=seed)

    def load_expert(
        self, path: str | os.PathLike, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> nn.Module:
        return load_masked_expert(path, device, dtype=dtype)

    def loss(self, scheduler_name: str, vocab_size: int) -> LossFn:
        return masked_loss(run_path(scheduler_name, vocab_size))

    def router_vocab_size(self, vocab_size: int) -> int:
        return vocab_size + 1  # the router reads masked states

    def load_ensemble(
        self,
        run_dir: str | os.PathLike,
        device: torch.device | str | None = None,
        *,
        allow_missing: bool = False,
        load_router: bool = True,
        dtype: torch.dtype | None = None,
    ) -> MaskedEnsemble:
        return MaskedEnsemble.from_run(
            run_dir, device, allow_missing=allow_missing, load_router=load_router, dtype=dtype
        )

    def load_model(
        self, run_dir: str | os.PathLike, name: str, device: torch.device | str | None, dtype: torch.dtype | None
    ) -> MaskedEnsemble:
        """Expert ``name`` of the run alone, as a one-expert ensemble (the masked baseline is scored by
        `dfm eval`, not sampled)."""
        ensemble = MaskedEnsemble.from_run(run_dir, device, load_router=False, dtype=dtype)
        if name not in ensemble.names:
            raise DfmError(
                f"--model {name} is not an expert of {run_dir}: choose ensemble or one of "
                f"{', '.join(ensemble.names)} (a masked baseline is scored by dfm eval)"
            )
        index = ensemble.names.index(name)
        return MaskedEnsemble(
            [ensemble.experts[index]], None, tokenizer=ensemble.tokenizer, names=[name], path=ensemble.path
        )

    def generate(
        self,
        ensemble: MaskedEnsemble,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        request: GenerationRequest,
        on_progress: Callable[[int, list], None] | None = None,
    ) -> MaskedGeneration:
        """``generate_masked_text`` under ``request``: ``max_new_tokens`` masked positions filled in
        ``sampler_steps`` Euler steps (default 64)."""
        refused = {
            "--top-p": request.top_p != 1.0,
            "--top-k": request.top_k != 0,
            "--route-on": request.route_on != "token",
        }
        if any(refused.values()):
            raise DfmError(
                f"{', '.join(flag for flag, used in refused.items() if used)} apply to autoregressive runs only; "
                f"on the masked path use --sampler-steps, --routing, --k and --temperature"
            )
        return generate_masked_text(
            ensemble,
            prompts,
            length=request.max_new_tokens,
            steps=DEFAULT_SAMPLER_STEPS if request.sampler_steps is None else request.sampler_steps,
            routing=request.routing,
            k=request.k,
            temperature=request.temperature,
            seed=request.seed,
            clusters=request.clusters,
            exclude=request.exclude,
            on_step=on_progress,
        )


MASKED = MaskedKind()
