"""The autoregressive path (``path.kind=ar``): causal experts trained on next-token cross-entropy,
a router that reads prefixes, and one-token decoding of the routed mixture (models/path_kinds.py)."""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase
from transformers.models.auto import modeling_auto

from dfm.errors import DfmError
from dfm.loss import LossFn, dfm_loss
from dfm.routing import Routing
from models.ensemble import Ensemble
from models.expert import DEFAULT_ARCH, branch_from, build_expert, expert_config, load_expert
from models.generation import Generation, generate_text, single_model
from models.generation_request import GenerationRequest
from models.manifest import Manifest, resolve_inside, tokenizer_fingerprint
from models.scoring import document_bos
from models.tokenizer import load_tokenizer

#: The modes `dfm eval` scores on an autoregressive run.
AR_MODES = ("mixture", "top1", "top2", "bayes", "centroid", "oracle")


def lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The DFM loss of the AR path (``dfm.loss.dfm_loss``: next-token cross-entropy), padded labels dropped.

    With the shard's per-document ``position_ids`` and no cache, the model attends within each
    document only (see training.data.pack_blocks).
    """
    logits = model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"), use_cache=False).logits
    return dfm_loss(logits, batch["input_ids"], batch["labels"] >= 0)


class AutoregressiveKind:
    """``PathKind`` of the autoregressive path."""

    name = "ar"
    eval_modes = AR_MODES
    default_arch = DEFAULT_ARCH
    model_family = "causal LM"
    streams_tokens = True
    generate_hint = "topk --k 1 --show-routing"

    def model_types(self) -> Collection[str]:
        return modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    def initial_model(
        self, arch: dict[str, Any], tokenizer: PreTrainedTokenizerBase, seed: int, init: str | os.PathLike | None
    ) -> nn.Module:
        fields = {
            "bos_token_id": document_bos(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer.get_vocab()),
        }
        if init is not None:
            return branch_from(init, vocab_size=len(tokenizer), **fields)
        return build_expert(expert_config(len(tokenizer), arch=arch, **fields), seed=seed)

    def load_expert(
        self, path: str | os.PathLike, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> nn.Module:
        return load_expert(path, device, dtype=dtype)

    def loss(self, scheduler_name: str, vocab_size: int) -> LossFn:
        return lm_loss

    def router_vocab_size(self, vocab_size: int) -> int:
        return vocab_size

    def load_ensemble(
        self,
        run_dir: str | os.PathLike,
        device: torch.device | str | None = None,
        *,
        allow_missing: bool = False,
        load_router: bool = True,
        dtype: torch.dtype | None = None,
    ) -> Ensemble:
        return Ensemble.from_run(run_dir, device, allow_missing=allow_missing, load_router=load_router, dtype=dtype)

    def load_model(
        self, run_dir: str | os.PathLike, name: str, device: torch.device | str | None, dtype: torch.dtype | None
    ) -> Ensemble:
        """The run's baseline or expert ``name`` alone, as a one-expert ensemble (same decoding path)."""
        manifest = Manifest.load(run_dir)
        paths = {"baseline": manifest.baseline, **{e.name: e.path for e in manifest.experts}}
        if paths.get(name) is None:
            raise DfmError(
                f"--model {name} is not in {run_dir}/ensemble.json: choose ensemble, "
                f"{', '.join(n for n, p in paths.items() if p)}"
            )
        tokenizer = load_tokenizer(resolve_inside(run_dir, manifest.tokenizer))
        model = manifest.load_model(run_dir, paths[name], load_expert, device, dtype)
        manifest.verify(run_dir, manifest.tokenizer)
        return single_model(model, tokenizer, name=name)

    def generate(
        self,
        ensemble: Ensemble,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        request: GenerationRequest,
        on_progress: Callable[[int, list], None] | None = None,
    ) -> Generation:
        """``generate_text`` under ``request``, with a fresh centroid or oracle weigher per call."""
        if request.sampler_steps is not None:
            raise DfmError(
                "--sampler-steps is for runs on the masked path; this run is autoregressive (one token per step)"
            )
        weigher = None
        if request.routing is Routing.CENTROID:
            if request.partition is None:
                raise DfmError("centroid routing needs the run's partition: pass Manifest.load_partition(RUN)")
            weigher = ensemble.weigher(
                "centroid", partition=request.partition, centroid_temperature=request.centroid_temperature
            )
        elif request.routing is Routing.ORACLE:
            count = 1 if isinstance(prompts, str) else len(prompts)
            if request.clusters is None or len(request.clusters) != count:
                raise DfmError("oracle routing needs the true cluster of every prompt (--cluster K)")
            weigher = ensemble.weigher("oracle", oracle=list(request.clusters))
        return generate_text(
            ensemble,
            prompts,
            max_new_tokens=request.max_new_tokens,
            routing=request.routing,
            k=request.k,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            seed=request.seed,
            exclude=request.exclude,
            route_on=request.route_on,
            weigher=weigher,
            on_token=on_progress,
        )


AR = AutoregressiveKind()
