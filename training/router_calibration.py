"""The router after training: its temperature fitted on held-out documents, its fit to the experts'
posterior measured, and the seed model's embedding it may start from."""

from __future__ import annotations

import math
from pathlib import Path

import datasets
import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM

from dfm.errors import DfmError
from training.initial_model import branch_point
from training.run_config import RunConfig

#: log-temperatures searched (golden section) when fitting: T from 1/20 to 20
_LOG_T_RANGE = (-math.log(20.0), math.log(20.0))
_SEARCH_STEPS = 40


@torch.no_grad()
def _logits_and_targets(
    router: nn.Module, examples: datasets.Dataset, device: torch.device | None, batch_size: int = 64
) -> tuple[Tensor, Tensor]:
    """The router's logits (N, K) at every real position of ``examples`` (rows with a target), and those targets."""
    was_training = router.training
    router.eval()
    logits, targets = [], []
    for batch in examples.with_format("torch").iter(batch_size=batch_size):
        width = int(batch["length"].max())
        ids = batch["input_ids"][:, :width].long()
        rows = batch["targets"][:, :width]
        real = rows.sum(-1) > 0
        out = router(ids.to(device) if device is not None else ids).float().cpu()
        logits.append(out[real])
        targets.append(rows[real])
    router.train(was_training)
    return torch.cat(logits).double(), torch.cat(targets).double()


def fit_temperature(router: nn.Module, examples: datasets.Dataset, device: torch.device | None = None) -> float:
    """The T minimising the soft cross-entropy of softmax(logits / T) against ``examples``' targets
    (the seed paper's temperature, fitted on validation documents): a golden-section search over
    log T, deterministic. The router must be at temperature 1."""
    if router.config.temperature != 1:
        raise DfmError("fit the router's temperature from temperature 1 (the logits as trained)")
    logits, targets = _logits_and_targets(router, examples, device)

    def loss(log_t: float) -> float:
        return float(-(targets * torch.log_softmax(logits / math.exp(log_t), -1)).sum(-1).mean())

    low, high = _LOG_T_RANGE
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = loss(a), loss(b)
    for _ in range(_SEARCH_STEPS):
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = loss(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = loss(b)
    return math.exp((low + high) / 2)


def posterior_kl(router: nn.Module, examples: datasets.Dataset, device: torch.device | None = None) -> float:
    """Mean KL(target || router) in nats over the real positions of ``examples`` (0 log 0 = 0)."""
    logits, targets = _logits_and_targets(router, examples, device)
    log_q = torch.log_softmax(logits, -1)
    log_p = torch.where(targets > 0, targets.log(), torch.zeros_like(targets))
    return float((targets * (log_p - log_q)).sum(-1).mean())


def seed_embedding(run_dir: str | Path, config: RunConfig) -> Tensor | None:
    """The input embedding (V, H) of the model the run's experts branch from (RUN/seed, or the
    pretrained ``--init-from``); None for a run whose experts start from scratch."""
    source = branch_point(run_dir, config)
    if source is None:
        return None
    if Path(source).is_dir():
        model = config.kind.load_expert(source)
    else:  # a pretrained --init-from on the hub (the ar path alone admits one)
        model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=False)
    return model.get_input_embeddings().weight.detach().float()
