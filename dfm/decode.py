"""Decentralized decoding: route, run the selected experts, mix their probabilities, sample."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dfm.errors import DfmError
from dfm.mixing import check_k, exclude_log_weights, mix_log_probs
from dfm.pool import ExpertPool, Weigher
from dfm.posterior import BayesPosterior
from dfm.routing import Routing, Selection, select_experts
from dfm.sampling import check_sampling, sample_tokens


@dataclass
class DecodeConfig:
    routing: Routing = Routing.MIXTURE
    k: int | None = None  # experts kept per token for topk (and optionally centroid)
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # token filtering; 0 = off
    top_p: float = 1.0  # nucleus filtering; 1 = off
    max_new_tokens: int = 64
    route_on: str = "token"  # "token": re-route every token; "prompt": route once
    exclude: Sequence[int] = ()  # experts opted out at inference
    eos_id: int | None = None  # stop a row once it produced this token
    pad_id: int = 0  # filler for rows that already stopped

    def validate(self, num_experts: int) -> None:
        if self.route_on not in ("token", "prompt"):
            raise DfmError(f"route_on must be 'token' or 'prompt', got {self.route_on!r}")
        if self.max_new_tokens < 0:
            raise DfmError("max_new_tokens must be >= 0")
        if self.routing is Routing.TOPK:
            check_k(self.k or 1, num_experts)
        check_sampling(self.temperature, self.top_k, self.top_p)


@dataclass
class StepOutput:
    token: Tensor  # (B,) sampled tokens
    log_probs: Tensor  # (B, V) mixture log-probabilities the token was drawn from
    expert_log_probs: Tensor  # (B, E, V) of the experts that ran (any finite value where a row gave one no weight)
    selection: Selection


def decode_step(
    pool: ExpertPool,
    tokens: Tensor,
    attention_mask: Tensor,
    selection: Selection,
    config: DecodeConfig,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """One token for every row: run only the selected experts, each only on the rows that give it
    weight (when rows differ), mix in log space, sample."""
    log_weights = selection.log_weights[:, selection.active]
    used = torch.isfinite(log_weights)
    sparse = len(selection.active) > 1 and not bool(used.all())
    expert_log_probs = pool.next_token_log_probs(
        tokens, attention_mask, selection.active, rows=used if sparse else None
    )
    if len(selection.active) == 1:  # every row gives the one active expert weight 1: nothing to mix
        mixed = expert_log_probs[:, 0]
    elif sparse and bool((used.sum(-1) == 1).all()):  # one expert per row: the one finite term of the logsumexp
        chosen = used.long().argmax(-1, keepdim=True)  # (B, 1)
        picked = expert_log_probs.gather(1, chosen.unsqueeze(-1).expand(-1, 1, expert_log_probs.shape[-1])).squeeze(1)
        mixed = picked + log_weights.gather(1, chosen)  # in the dtype mix_log_probs sums in
    else:
        mixed = mix_log_probs(expert_log_probs, log_weights)
    token = sample_tokens(mixed, generator, config.temperature, config.top_k, config.top_p)
    return StepOutput(token, mixed, expert_log_probs, selection)


@dataclass
class DecodeResult:
    tokens: Tensor  # (B, T + n) prompt and generated tokens
    attention_mask: Tensor  # (B, T + n)
    new_tokens: Tensor  # (B, n)
    lengths: Tensor  # (B,) generated tokens per row, up to and including EOS
    token_log_probs: Tensor  # (B, n) log-prob of each sampled token under the mixture it was drawn from
    weights: Tensor  # (B, n, K) routing distribution of every generated token (before sparsification)
    used_weights: Tensor  # (B, n, K) weights actually mixed (zero for experts that did not run)
    experts_ran: list[list[int]]  # per step, the experts that ran a forward pass


def generate(
    pool: ExpertPool,
    tokens: Tensor,
    attention_mask: Tensor,
    config: DecodeConfig,
    *,
    weigher: Weigher | None = None,
    log_prior: Tensor | None = None,
    generator: torch.Generator | None = None,
    on_step: Callable[[int, Tensor], None] | None = None,
) -> DecodeResult:
    """Decode up to ``config.max_new_tokens`` tokens after left-padded prompts ``tokens`` (B, T).

    ``weigher`` supplies routing weights for every mode but ``bayes``, which needs ``log_prior``
    and scores the prompt with every expert. ``on_step(i, token)`` is called after every step.
    """
    config.validate(pool.num_experts)
    bayes = config.routing is Routing.BAYES
    if bayes and log_prior is None:
        raise DfmError("bayes routing needs the cluster priors")
    if not bayes and weigher is None:
        raise DfmError(f"{config.routing.value} routing needs a weigher (router, centroid or oracle)")
    posterior = None
    if bayes:
        posterior = BayesPosterior(log_prior.to(tokens.device), tokens.shape[0])
        # excluded experts never run, not even on the prompt: their weight is zero whatever they score
        excluded = set(config.exclude)
        scored = [e for e in range(pool.num_experts) if e not in excluded]
        evidence = torch.zeros_like(posterior.log_joint)
        evidence[:, scored] = pool.prefix_log_likelihood(tokens, attention_mask, scored).to(evidence.dtype)
        posterior.update(evidence)

    # preallocated so that a step writes one column instead of concatenating the whole batch
    batch, length = tokens.shape
    buffer = tokens.new_full((batch, length + config.max_new_tokens), config.pad_id)
    buffer[:, :length] = tokens
    mask_buffer = attention_mask.new_ones((batch, length + config.max_new_tokens))
    mask_buffer[:, :length] = attention_mask
    prompt_length = length

    finished = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
    lengths = torch.zeros(batch, dtype=torch.long, device=tokens.device)
    log_weights, used, ran, chosen = [], [], [], []
    selection = None
    for step in range(config.max_new_tokens):
        tokens, attention_mask = buffer[:, :length], mask_buffer[:, :length]
        if selection is None or config.route_on == "token":
            raw = posterior.log_posterior if bayes else weigher(tokens, attention_mask)
            if raw.shape[-1] != pool.num_experts:
                raise DfmError(f"routing weights cover {raw.shape[-1]} experts but the pool has {pool.num_experts}")
            routed = exclude_log_weights(raw, config.exclude) if config.exclude else raw
            selection = select_experts(routed, config.routing, config.k, generator)
        out = decode_step(pool, tokens, attention_mask, selection, config, generator)
        token = out.token
        chosen.append(out.log_probs.gather(-1, token.unsqueeze(-1)).squeeze(-1))
        if bayes and config.route_on == "token":
            picked = out.expert_log_probs.gather(-1, token.view(-1, 1, 1).expand(-1, len(selection.active), 1))
            evidence = torch.zeros_like(posterior.log_joint)
            evidence[:, selection.active] = picked.squeeze(-1).to(evidence.dtype)
            posterior.update(evidence)
        if config.eos_id is not None:
            token = torch.where(finished, torch.full_like(token, config.pad_id), token)
        lengths += (~finished).long()
        log_weights.append(routed)
        used.append(selection.log_weights)
        ran.append(list(selection.active))
        buffer[:, length] = token
        length += 1
        if on_step is not None:
            on_step(step, token)
        if config.eos_id is not None:
            finished |= token == config.eos_id
            if finished.all():
                break

    no_weights = torch.zeros(batch, 0, pool.num_experts, device=tokens.device)
    return DecodeResult(
        tokens=buffer[:, :length],
        attention_mask=mask_buffer[:, :length],
        new_tokens=buffer[:, prompt_length:length],
        lengths=lengths,
        token_log_probs=torch.stack(chosen, 1) if chosen else no_weights[..., 0],
        weights=torch.stack(log_weights, 1).exp() if log_weights else no_weights,
        used_weights=torch.stack(used, 1).exp() if used else no_weights,
        experts_ran=ran,
    )
