"""Text in, text out on the masked path: prompts as a clean prefix, ``length`` masked positions
after it, filled by the N-step sampler (``dfm.masked_sampler.euler_sample``) with the ensemble's
routed denoiser. A generated text ends at the first EOS the sampler placed (documents end with
one in training), else after ``length`` tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dfm.errors import DfmError
from dfm.masked_sampler import euler_sample
from dfm.mixing import check_k
from dfm.routing import Routing
from dfm.sampling import check_sampling
from models.generation import encode_prompts, fit_prompt
from models.masked_ensemble import MaskedEnsemble, masked_routing


@dataclass
class MaskedGeneration:
    """What ``generate_masked_text`` produced, per prompt."""

    texts: list[str]  # the generated text after the prompt, up to the first EOS
    token_ids: list[list[int]]  # the generated ids, up to and including the first EOS
    prompt_ids: list[list[int]]  # prompt ids actually used (possibly truncated from the left)
    steps: int
    seconds: float
    names: list[str]

    def summary(self) -> str:
        """One line on the sampling (the first prompt's tokens, the steps and seconds)."""
        return f"{len(self.token_ids[0])} tokens in {self.steps} steps ({self.seconds:.2f}s)"

    def to_json(self) -> dict:
        return {
            "names": self.names,
            "texts": self.texts,
            "token_ids": self.token_ids,
            "prompt_ids": self.prompt_ids,
            "steps": self.steps,
            "seconds": self.seconds,
        }


def generate_masked_text(
    ensemble: MaskedEnsemble,
    prompts: str | Sequence[str] | Sequence[Sequence[int]],
    *,
    length: int = 64,
    steps: int = 64,
    routing: str | Routing = "mixture",
    k: int | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    clusters: Sequence[int] | None = None,
    exclude: Sequence[int] = (),
    on_step: Callable[[int, list[str]], None] | None = None,
) -> MaskedGeneration:
    """Fill ``length`` positions after every prompt (a string, strings, or token-id lists) in
    ``steps`` Euler steps of the masked path.

    ``routing``: mixture, topk (``k``, default 1), switch (one expert drawn from the router per
    step) or oracle (``clusters``: one expert per prompt). ``on_step(step, texts)`` gets every
    row's text after each step, masks shown as "_".
    """
    mode = masked_routing(routing)
    tokenizer = ensemble.tokenizer
    if tokenizer is None or tokenizer.eos_token_id is None:
        raise DfmError(
            "the masked ensemble needs the run's tokenizer with an EOS token: load it with MaskedEnsemble.from_run"
        )
    check_sampling(temperature, top_k=0, top_p=1.0)
    if length < 1:
        raise DfmError(f"--max-new-tokens must be at least 1, got {length}")
    context = ensemble.context
    if length > context:
        raise DfmError(f"--max-new-tokens {length} exceeds the masked experts' context of {context} tokens: lower it")
    encoded = encode_prompts(prompts, tokenizer, ensemble.path.vocab_size)
    encoded = [fit_prompt(ids, context - length, context)[0] for ids in encoded]
    oracle = None
    if mode is Routing.ORACLE:
        if clusters is None or len(clusters) != len(encoded):
            raise DfmError("oracle routing needs the true cluster of every prompt (--cluster K)")
        bad = [c for c in clusters if not 0 <= c < ensemble.num_experts]
        if bad:
            raise DfmError(f"--cluster {bad[0]} is not an expert of this ensemble (0..{ensemble.num_experts - 1})")
        oracle = torch.tensor(list(clusters))
    if k is not None:
        check_k(k, ensemble.num_experts)

    mask_id = ensemble.path.mask_id
    generator = torch.Generator().manual_seed(seed)
    denoise = ensemble.denoiser(mode, k=k, oracle=oracle, exclude=exclude, generator=generator)
    # one batch without padding: a shorter prompt's row carries masks beyond its `length` positions,
    # sampled with the rest and dropped from its text
    width = max(len(ids) for ids in encoded) + length
    x = torch.full((len(encoded), width), mask_id, dtype=torch.long)
    for row, ids in enumerate(encoded):
        x[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    x = x.to(ensemble.experts[0].device)

    def report(step: int, state: Tensor) -> None:
        if on_step is not None:
            on_step(
                step,
                [
                    _show(tokenizer, row[len(ids) : len(ids) + length].tolist(), mask_id)
                    for row, ids in zip(state.cpu(), encoded)
                ],
            )

    started = time.perf_counter()
    final = euler_sample(
        denoise, x, ensemble.path, steps, generator=generator, temperature=temperature, on_step=report
    ).cpu()
    seconds = time.perf_counter() - started
    token_ids = []
    for row, ids in zip(final, encoded):
        generated = row[len(ids) : len(ids) + length].tolist()
        if tokenizer.eos_token_id in generated:
            generated = generated[: generated.index(tokenizer.eos_token_id) + 1]
        token_ids.append(generated)
    texts = [tokenizer.decode([t for t in ids if t != tokenizer.eos_token_id]) for ids in token_ids]
    return MaskedGeneration(texts, token_ids, [list(ids) for ids in encoded], steps, seconds, list(ensemble.names))


def _show(tokenizer, ids: list[int], mask_id: int) -> str:
    """Text of a partly revealed row, every mask shown as "_"."""
    pieces, run = [], []
    for token in ids:
        if token == mask_id:
            if run:
                pieces.append(tokenizer.decode(run))
                run = []
            pieces.append("_")
        else:
            run.append(token)
    if run:
        pieces.append(tokenizer.decode(run))
    return "".join(pieces)
