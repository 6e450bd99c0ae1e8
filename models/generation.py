"""Text in, text out: the generation API of the routed ensemble.

``generate_text`` encodes prompts with the ensemble's tokenizer, fits them into the context,
picks the routing weights the mode needs and runs the core loop ``dfm.decode.generate`` over
the ensemble's per-expert KV caches. A single model goes through the same code path as a
one-expert ensemble (``single_model``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dfm.decode import DecodeConfig, generate
from dfm.errors import DfmError
from dfm.mixing import check_k, exclude_log_weights
from dfm.pool import Weigher
from dfm.routing import Routing, parse_routing
from models.ensemble import Ensemble
from models.scoring import document_bos
from models.weighers import RouterWeigher


@dataclass
class Generation:
    """What ``generate_text`` produced, per prompt unless said otherwise."""

    texts: list[str]  # continuation, decoded, without the prompt and without the final EOS
    token_ids: list[list[int]]  # generated ids, up to and including EOS if produced
    prompt_ids: list[list[int]]  # prompt ids actually used (BOS first, possibly truncated)
    weights: list[Tensor]  # (n_i, K) routing distribution of each generated token (before sparsification)
    token_log_probs: list[list[float]]  # log-prob of each generated token under the mixture actually used
    experts_ran: list[list[int]]  # per step, the experts that ran a forward pass
    forward_passes: list[int]  # per expert
    tokens_processed: list[int]  # per expert
    truncated: list[bool]  # the prompt was cut from the left to fit the context
    names: list[str]  # expert names, in ensemble order

    def summary(self) -> str:
        """One line on what the decoding cost (the first prompt's tokens, every expert's passes)."""
        return (
            f"{len(self.token_ids[0])} tokens; expert forward passes {self.forward_passes}, "
            f"tokens processed {self.tokens_processed}"
        )

    def to_json(self) -> dict:
        """A plain JSON-serialisable dict."""
        return {
            "names": list(self.names),
            "texts": list(self.texts),
            "token_ids": [list(ids) for ids in self.token_ids],
            "prompt_ids": [list(ids) for ids in self.prompt_ids],
            "weights": [w.tolist() for w in self.weights],
            "token_log_probs": [list(lp) for lp in self.token_log_probs],
            "experts_ran": [list(step) for step in self.experts_ran],
            "forward_passes": list(self.forward_passes),
            "tokens_processed": list(self.tokens_processed),
            "truncated": list(self.truncated),
        }


def generate_text(
    ensemble: Ensemble,
    prompts: str | Sequence[str] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    routing: str | Routing = "mixture",
    k: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    exclude: Sequence[int] = (),
    route_on: str = "token",
    stop_at_eos: bool = True,
    weigher: Weigher | None = None,
    on_token: Callable[[int, list[int]], None] | None = None,
) -> Generation:
    """Continue every prompt with the routed ensemble.

    ``prompts`` is one string, a list of strings, or a list of token-id lists (used as given);
    each is BOS-prefixed (``models.scoring.document_bos``, as training and scoring read a
    document). ``routing`` is a mode of README, "Design: routing modes": mixture, topk and switch
    use the ensemble's router, bayes its priors; centroid and oracle need ``weigher``
    (``models.weighers.CentroidWeigher`` or ``OracleWeigher``), which may also replace the
    router in the router modes. A weigher must be fresh (not used on another batch).
    ``k`` is for topk (default 1) and optionally centroid. ``exclude`` lists expert indices that
    get zero weight. ``on_token(step, tokens)`` receives the token of every row as it is
    produced (the pad id for rows that already stopped).
    """
    mode = parse_routing(routing)
    tokenizer = ensemble.tokenizer
    if tokenizer is None:
        raise DfmError("the ensemble has no tokenizer: load it with Ensemble.from_run or build it with tokenizer=")
    if tokenizer.eos_token_id is None:
        raise DfmError(
            "the tokenizer has no EOS token (dfm ends every document with it, and pads with it "
            "when there is no pad token): rebuild the tokenizer with `dfm prepare`"
        )
    eos_id, bos_id = tokenizer.eos_token_id, document_bos(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    num_experts = ensemble.num_experts
    _check_k(mode, k, num_experts)
    exclude_log_weights(torch.zeros(1, num_experts, dtype=torch.float64), exclude)  # fail before any compute
    weigher = _weigher_for(ensemble, mode, weigher)

    context = _context_length(ensemble, uses_router=isinstance(weigher, RouterWeigher))
    if max_new_tokens >= context:
        raise DfmError(
            f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the context of "
            f"{context} tokens: lower --max-new-tokens below {context}"
        )
    rows, truncated = [], []
    for ids in encode_prompts(prompts, tokenizer, ensemble.vocab_size):
        # the models read BOS, the prompt and every generated token but the last: P + n positions
        ids, cut = fit_prompt(ids, context - max_new_tokens, context)
        rows.append([bos_id] + ids)
        truncated.append(cut)
    tokens, mask = _left_pad(rows, pad_id, ensemble.device)

    config = DecodeConfig(
        routing=mode,
        k=k,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        route_on=route_on,
        exclude=tuple(exclude),
        eos_id=eos_id if stop_at_eos else None,
        pad_id=pad_id,
    )
    ensemble.reset()
    # on the models' device, so that sampling needs no copy to the host at every token (a CUDA
    # generator draws other numbers than the CPU's: the same seed repeats per device)
    generator = torch.Generator(device=ensemble.device).manual_seed(seed)

    def on_step(step: int, token: Tensor) -> None:
        if on_token is not None:
            on_token(step, token.tolist())

    result = generate(
        ensemble,
        tokens,
        mask,
        config,
        weigher=weigher,
        log_prior=ensemble.log_prior if mode is Routing.BAYES else None,
        generator=generator,
        on_step=on_step,
    )

    log_probs = result.token_log_probs
    lengths = result.lengths.tolist()
    token_ids = [result.new_tokens[i, :n].tolist() for i, n in enumerate(lengths)]
    texts = []
    for ids in token_ids:
        if stop_at_eos and ids and ids[-1] == eos_id:
            ids = ids[:-1]
        texts.append(tokenizer.decode(ids, skip_special_tokens=False))
    return Generation(
        texts=texts,
        token_ids=token_ids,
        prompt_ids=rows,
        weights=[result.weights[i, :n].cpu() for i, n in enumerate(lengths)],
        token_log_probs=[log_probs[i, :n].tolist() for i, n in enumerate(lengths)],
        experts_ran=result.experts_ran,
        forward_passes=list(ensemble.forward_passes),
        tokens_processed=list(ensemble.tokens_processed),
        truncated=truncated,
        names=list(ensemble.names),
    )


def single_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str = "model") -> Ensemble:
    """One causal LM (the baseline, or one expert) as a one-expert ensemble: same generation path."""
    return Ensemble([model], torch.zeros(1, dtype=torch.float64), tokenizer=tokenizer, names=[name])


# --- helpers ---------------------------------------------------------------------------------


def _check_k(mode: Routing, k: int | None, num_experts: int) -> None:
    if k is None:
        return
    if mode not in (Routing.TOPK, Routing.CENTROID):
        raise DfmError(f"--k applies to topk and centroid routing only, not {mode.value}")
    check_k(k, num_experts)


def _weigher_for(ensemble: Ensemble, mode: Routing, weigher: Weigher | None) -> Weigher | None:
    """The weigher the mode routes with (None for bayes, which uses the priors)."""
    if mode is Routing.BAYES:
        if weigher is not None:
            raise DfmError("bayes routing computes its weights from the experts and priors: do not pass a weigher")
        return None
    if weigher is not None:
        return weigher
    if mode is Routing.CENTROID:
        raise DfmError(
            "centroid routing needs the partition: run `dfm prepare` (it writes RUN/partition) and pass "
            "weigher=CentroidWeigher(Partition.load(RUN/partition))"
        )
    if mode is Routing.ORACLE:
        raise DfmError(
            "oracle routing needs the true cluster of every prompt: pass weigher=OracleWeigher(clusters, num_experts)"
        )
    return ensemble.router_weigher()


def _context_length(ensemble: Ensemble, uses_router: bool) -> int:
    """Longest sequence every model involved accepts (experts, and the router if it runs)."""
    sizes = [getattr(e.config, "max_position_embeddings", None) for e in ensemble.experts]
    if uses_router:
        sizes.append(ensemble.router.config.max_positions)
    sizes = [s for s in sizes if s]
    if not sizes:
        raise DfmError("the experts' configs do not say their context (max_position_embeddings): set it in config.json")
    return min(sizes)


def encode_prompts(
    prompts: str | Sequence[str] | Sequence[Sequence[int]], tokenizer: PreTrainedTokenizerBase, vocab_size: int
) -> list[list[int]]:
    """Token ids of every prompt (strings encoded, id lists checked against ``vocab_size``), without BOS."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise DfmError("no prompts given: pass at least one (an empty string is a valid prompt)")
    if all(isinstance(p, str) for p in prompts):
        return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if any(isinstance(p, (str, int)) for p in prompts):
        raise DfmError("prompts must be all strings or all lists of token ids (one list per prompt)")
    rows = [p.tolist() if isinstance(p, Tensor) else [int(i) for i in p] for p in prompts]
    bad = sorted({i for row in rows for i in row if not 0 <= i < vocab_size})
    if bad:
        raise DfmError(
            f"prompt token ids {bad[:5]} are outside the vocabulary of {vocab_size}: use the run's tokenizer"
        )
    return rows


def fit_prompt(ids: list[int], room: int, context: int) -> tuple[list[int], bool]:
    """The last ``room`` tokens of a prompt (with a warning when that cuts it), and whether it was cut:
    a prompt longer than the room the generated tokens leave in a ``context``-token window."""
    if len(ids) <= room:
        return ids, False
    warnings.warn(
        f"prompt of {len(ids)} tokens truncated from the left to {room} to fit the context of {context}", stacklevel=3
    )
    return ids[len(ids) - room :], True


def _left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return tokens.to(device), mask.to(device)
