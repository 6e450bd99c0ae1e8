"""The ensemble: experts with their own KV caches, a router, priors and one shared tokenizer.

It implements the core's ExpertPool. Each expert remembers how many columns of the growing
token batch it has seen; when it is asked for the next token after falling behind (sparse
routing skipped it), it first prefills what it missed in one batched forward.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from dfm.errors import DfmError
from dfm.routing import Routing, parse_mode
from dfm.tensors import autocast_for, positions_from_mask
from models.cache_argument import cache_kwargs
from models.expert import load_expert
from models.manifest import Manifest, resolve_inside, tokenizer_fingerprint
from models.partition import Partition
from models.router import Router
from models.scoring import document_bos
from models.stacked import StackedLlama
from models.stacked import supports as supports_stacking
from models.tokenizer import load_tokenizer
from models.weighers import (
    DEFAULT_TEMPERATURE,
    AnyWeigher,
    BayesWeigher,
    CentroidWeigher,
    OracleWeigher,
    PriorWeigher,
    RouterWeigher,
)


class _ExpertState:
    """One expert's generic KV cache and how many columns it has consumed."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.seen = 0


class Ensemble:
    """K experts over one tokenizer, usable as an ExpertPool.

    Llama-architecture experts with one shared configuration run on the stacked engine
    (models/stacked.py: one batched forward for all K); any other causal LM runs through its
    own Hugging Face forward with a DynamicCache. ``engine="hf"`` forces the generic path.
    """

    def __init__(
        self,
        experts: Sequence[PreTrainedModel],
        log_prior: Tensor,
        *,
        router: Router | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        names: Sequence[str] | None = None,
        clusters: Sequence[int] | None = None,
        engine: str = "auto",
    ) -> None:
        if not experts:
            raise DfmError("an ensemble needs at least one expert")
        vocab = {e.config.vocab_size for e in experts}
        if len(vocab) != 1:
            raise DfmError(f"experts have different vocabulary sizes {sorted(vocab)}: they must share one tokenizer")
        if router is not None and router.config.num_experts != len(experts):
            raise DfmError(
                f"the router routes over {router.config.num_experts} experts but the ensemble has "
                f"{len(experts)}: retrain it with `dfm train-router`"
            )
        if engine not in ("auto", "hf"):
            raise DfmError(f"engine must be 'auto' or 'hf', got {engine!r}")
        self.experts = list(experts)
        self.log_prior = log_prior.double()
        self.router = router
        self.tokenizer = tokenizer
        self.names = list(names) if names is not None else [f"expert-{i}" for i in range(len(experts))]
        #: the cluster each expert was trained on (differs from its index when experts are missing)
        self.clusters = list(clusters) if clusters is not None else list(range(len(experts)))
        self.device = next(self.experts[0].parameters()).device
        self.vocab_size = vocab.pop()
        self.engine = StackedLlama(self.experts) if engine == "auto" and supports_stacking(self.experts) else None
        self.reset()

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def compile(self) -> None:
        """Compile the stacked engine's one-token decoding step (``StackedLlama.compile``)."""
        if self.engine is None:
            raise DfmError("--compile works on the stacked engine only: Llama experts that share one configuration")
        self.engine.compile()

    def reset(self) -> None:
        """Forget all caches and counters: the next call starts a new batch of sequences."""
        self._states = [_ExpertState() for _ in self.experts]
        self._last: Tensor | None = None  # (K, B, V) every expert's latest next-token log-probs
        self._batch_size: int | None = None
        self._longest = 0  # columns of the longest token batch seen since reset
        self._ragged = False  # row routing ran: the stacked path must go on pair by pair
        self.forward_passes = [0] * self.num_experts
        self.tokens_processed = [0] * self.num_experts

    # --- ExpertPool -------------------------------------------------------------------------
    @torch.inference_mode()
    def next_token_log_probs(
        self, tokens: Tensor, attention_mask: Tensor, experts: Sequence[int], rows: Tensor | None = None
    ) -> Tensor:
        self._start_batch(tokens)
        if self.engine is not None and (rows is not None or self._ragged):
            self._advance_pairs(tokens, attention_mask, experts, rows)
        else:
            for group in self._groups(experts, tokens):
                self._advance(group, tokens, attention_mask)
        if list(experts) == list(range(self.num_experts)):
            return self._last.transpose(0, 1)  # a view: valid until the next call
        return self._last[list(experts)].transpose(0, 1)

    @torch.inference_mode()
    def prefix_log_likelihood(self, tokens: Tensor, attention_mask: Tensor, experts: Sequence[int]) -> Tensor:
        if any(self._states[e].seen for e in experts):
            raise DfmError("prefix_log_likelihood must be the first call after Ensemble.reset()")
        self._start_batch(tokens)
        totals = [self._advance(group, tokens, attention_mask, score=True) for group in self._groups(experts, tokens)]
        return torch.cat(totals, dim=1)

    def _start_batch(self, tokens: Tensor) -> None:
        if self._batch_size is None:
            self._batch_size = tokens.shape[0]
            self._last = torch.zeros(self.num_experts, self._batch_size, self.vocab_size, device=tokens.device)
            if self.engine is not None:
                self.engine.reset(self._batch_size)
        if tokens.shape[1] < self._longest:
            raise DfmError("token batch shrank between calls: call Ensemble.reset() before a new batch")
        self._longest = tokens.shape[1]

    def _groups(self, experts: Sequence[int], tokens: Tensor) -> list[range]:
        """Experts that advance together: all K in one stacked forward when they have seen the same
        columns, otherwise one by one (each catching up on what it missed)."""
        length = tokens.shape[1]
        behind = [e for e in experts if self._states[e].seen < length]
        everyone = range(self.num_experts)
        in_order = list(experts) == list(everyone)  # the stacked group returns experts 0..K-1 in order
        if (
            self.engine is not None
            and in_order
            and len(behind) == self.num_experts
            and len({s.seen for s in self._states}) == 1
        ):
            return [everyone]
        return [range(e, e + 1) for e in behind]

    def _advance(self, group: range, tokens: Tensor, attention_mask: Tensor, score: bool = False) -> Tensor | None:
        """Feed the experts of ``group`` the columns they have not seen and store their next-token
        log-probs; with ``score``, return (B, len(group)) summed log-likelihoods of the real tokens."""
        seen, length = self._states[group[0]].seen, tokens.shape[1]
        if length > self.experts[0].config.max_position_embeddings:
            raise DfmError(
                f"sequence of {length} tokens exceeds the experts' context of "
                f"{self.experts[0].config.max_position_embeddings}: truncate the prompt or generate less"
            )
        new = tokens[:, seen:]
        with autocast_for(self.device):
            if self.engine is not None:
                logits = self.engine.forward(slice(group.start, group.stop), new, attention_mask, all_logits=score)
            else:
                logits = self._hf_forward(group[0], new, attention_mask, seen, score).unsqueeze(0)
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # (E, B, T', V)
        self._last[group.start : group.stop] = log_probs[:, :, -1]
        for e in group:
            self._states[e].seen = length
            self.forward_passes[e] += 1
            self.tokens_processed[e] += new.numel()
        if not score:
            return None
        picked = log_probs[:, :, :-1].gather(-1, new[:, 1:].expand(len(group), -1, -1).unsqueeze(-1)).squeeze(-1)
        real = (attention_mask[:, :-1] * attention_mask[:, 1:]).bool()
        return picked.masked_fill(~real, 0.0).sum(-1).double().T  # padding holds no evidence, even -inf

    def _advance_pairs(
        self, tokens: Tensor, attention_mask: Tensor, experts: Sequence[int], rows: Tensor | None
    ) -> None:
        """Row routing on the stacked engine: every listed expert runs on the rows that need it
        (``rows`` (B, len(experts)) bool; None: all). The pairs that lack only the newest column
        run together in one forward, including rows of a running expert that do not weight it at
        this step but are current (so a router that changes its mind does not make them catch up
        later); an expert catching up on more columns for some rows runs them in one forward of
        its own. Rows an expert skips keep their previous next-token log-probs, which carry zero
        weight in the mixture."""
        self._ragged = True  # from now on rows of one expert may differ in what they have seen
        length, batch = tokens.shape[1], tokens.shape[0]
        wanted = rows.tolist() if rows is not None else [[True] * len(experts)] * batch
        groups: dict[int, list[tuple[int, int]]] = {-1: []}  # -1: the newest column only; e: expert e catching up
        for i, e in sorted(enumerate(experts), key=lambda pair: pair[1]):
            if not any(wanted[r][i] for r in range(batch)):
                continue
            filled = self.engine.filled[e]
            # a router that came back to this expert for a row it fell behind on may do so again:
            # bring it up to date on every row it has read before, not only on that one
            returning = any(wanted[r][i] and 0 < filled[r] < length - 1 for r in range(batch))
            for r in range(batch):
                if filled[r] == length - 1:  # also rows that do not need it now: kept current for one more
                    groups[-1].append((e, r))  # pair in the shared forward, it need not catch up later
                elif filled[r] < length and (wanted[r][i] or (returning and filled[r] > 0)):
                    groups.setdefault(e, []).append((e, r))
        for pairs in groups.values():
            if not pairs:
                continue
            pair_experts, pair_rows = zip(*pairs)
            new = length - min(self.engine.filled[e][r] for e, r in pairs)
            first, last = pair_experts[0], pair_experts[-1]
            with autocast_for(self.device):
                if new == 1 and len(pairs) == (last - first + 1) * batch:  # whole rows of a range of experts:
                    group = range(first, last + 1)  # the plain stacked forward, no per-pair indexing
                    for e in group:
                        self._states[e].seen = length - 1  # what every row of these experts has seen
                    self._advance(group, tokens, attention_mask)
                    continue
                logits = self.engine.forward_pairs(pair_experts, pair_rows, tokens, attention_mask)
            self._last[list(pair_experts), list(pair_rows)] = torch.log_softmax(logits.float(), dim=-1)
            for e in pair_experts:
                self.tokens_processed[e] += new
            for e in sorted(set(pair_experts)):
                self.forward_passes[e] += 1

    def _hf_forward(self, e: int, new: Tensor, attention_mask: Tensor, seen: int, score: bool) -> Tensor:
        state = self._states[e]
        if state.cache is None:
            state.cache = DynamicCache(config=self.experts[e].config)
        return self.experts[e](
            input_ids=new,
            attention_mask=attention_mask,
            position_ids=positions_from_mask(attention_mask)[:, seen:],
            **cache_kwargs(self.experts[e], state.cache),
            use_cache=True,
            logits_to_keep=0 if score else 1,
        ).logits

    # --- routing --------------------------------------------------------------------------
    def router_weigher(self) -> RouterWeigher | PriorWeigher:
        """The router's weigher; a one-expert ensemble without a router weighs with its prior."""
        if self.router is None:
            if self.num_experts == 1:
                return PriorWeigher(self.log_prior)
            raise DfmError("this ensemble has no router: train one with `dfm train-router`, or use --routing bayes")
        return RouterWeigher(self.router)

    def weigher(
        self,
        mode: str,
        *,
        partition: Partition | None = None,
        oracle: Sequence[int] | None = None,
        centroid_temperature: float = DEFAULT_TEMPERATURE,
    ) -> AnyWeigher:
        """The weigher of a routing mode (``dfm eval`` and ``dfm generate`` names): the router for
        mixture, topN and switch; the priors and the experts' likelihoods for bayes; the
        partition's centres for centroid; the true ``oracle`` cluster of every prompt or document."""
        routing, _ = parse_mode(mode)
        if routing is Routing.BAYES:
            return BayesWeigher(self.log_prior)
        if routing is Routing.CENTROID:
            if partition is None:
                raise DfmError(
                    "centroid routing needs the partition (RUN/partition): run `dfm prepare`, or drop the mode"
                )
            bos_id = document_bos(self.tokenizer) if self.tokenizer is not None else None
            return CentroidWeigher(partition, centroid_temperature, bos_id=bos_id, clusters=self.clusters)
        if routing is Routing.ORACLE:
            if oracle is None:
                raise DfmError("oracle routing needs the true cluster of every prompt: pass --cluster K")
            return OracleWeigher(oracle, self.num_experts)
        return self.router_weigher()

    # --- loading --------------------------------------------------------------------------
    @classmethod
    def from_run(
        cls,
        run_dir: str | os.PathLike,
        device: torch.device | str | None = None,
        allow_missing: bool = False,
        load_router: bool = True,
        dtype: torch.dtype | None = None,
    ) -> Ensemble:
        """Load experts (in ``dtype`` if given; the router stays float32), router, priors and
        tokenizer named by ``RUN/ensemble.json``.

        A missing or unreadable expert is an error naming it, unless ``allow_missing``: then it
        is left out with a warning and the priors (and router weights) of the rest renormalised.
        """
        members = load_members(
            run_dir, load_expert, device=device, allow_missing=allow_missing, load_router=load_router, dtype=dtype
        )
        return cls(
            members.experts,
            members.log_prior,
            router=members.router,
            tokenizer=members.tokenizer,
            names=members.names,
            clusters=members.clusters,
        )


@dataclass
class Members:
    """What ``RUN/ensemble.json`` names, loaded: the experts present, their priors and names, router, tokenizer."""

    experts: list[PreTrainedModel]
    log_prior: Tensor
    names: list[str]
    clusters: list[int]
    router: torch.nn.Module | None
    tokenizer: PreTrainedTokenizerBase
    manifest: Manifest


def load_members(
    run_dir: str | os.PathLike,
    loader: Callable[..., PreTrainedModel],
    *,
    device: torch.device | str | None = None,
    allow_missing: bool = False,
    load_router: bool = True,
    kind: str = "ar",
    extra_symbols: int = 0,
    dtype: torch.dtype | None = None,
) -> Members:
    """Load the members of a run's ensemble with ``loader(path, device, dtype=dtype)``, refusing a run of
    another path ``kind`` and any file whose sha256 differs from the one ``dfm assemble`` recorded.
    The experts' vocabulary is the tokenizer's plus ``extra_symbols`` (the mask of the masked path)."""
    manifest = Manifest.load(run_dir)
    if manifest.path_kind != kind:
        raise DfmError(
            f"{run_dir} was trained on the {manifest.path_kind} path, not the {kind} path: "
            f"load it with models.path_kinds.path_kind({manifest.path_kind!r}).load_ensemble"
        )
    tokenizer = load_tokenizer(resolve_inside(run_dir, manifest.tokenizer))
    fingerprint = tokenizer_fingerprint(tokenizer.get_vocab())
    if fingerprint != manifest.tokenizer_fingerprint:
        raise DfmError(
            f"the tokenizer in {run_dir} does not match ensemble.json: re-run `dfm assemble --run {run_dir}`"
        )
    manifest.verify(run_dir, manifest.tokenizer)
    experts, kept = [], []
    for index, entry in enumerate(manifest.experts):
        try:
            expert = manifest.load_model(run_dir, entry.path, loader, device, dtype)
        except DfmError as err:
            if not allow_missing:
                raise DfmError(f"{entry.name}: {err} (or pass --allow-missing to generate without it)") from err
            warnings.warn(f"{entry.name} left out: {err}", stacklevel=3)
            continue
        check_expert_tokenizer(expert, entry.name, fingerprint, manifest.vocab_size + extra_symbols)
        experts.append(expert)
        kept.append(index)
    if not experts:
        raise DfmError(f"no expert of {run_dir} could be loaded: train them with `dfm train-expert`")
    prior = torch.tensor([manifest.experts[i].prior for i in kept], dtype=torch.float64)
    router = None
    if load_router and manifest.router is not None:
        router = Router.from_pretrained(resolve_inside(run_dir, manifest.router), device=device)
        manifest.verify(run_dir, manifest.router)
        if len(kept) < len(manifest.experts):
            router = SubsetRouter(router, kept)
    return Members(
        experts,
        (prior / prior.sum()).log(),
        [manifest.experts[i].name for i in kept],
        kept,
        router,
        tokenizer,
        manifest,
    )


def check_expert_tokenizer(expert: PreTrainedModel, name: str, fingerprint: str, vocab_size: int) -> None:
    """Refuse an expert trained with another tokenizer."""
    theirs = getattr(expert.config, "dfm_tokenizer_fingerprint", None)
    if expert.config.vocab_size != vocab_size:
        raise DfmError(
            f"{name} has a vocabulary of {expert.config.vocab_size} tokens but the ensemble's tokenizer "
            f"has {vocab_size}: retrain it on this run's tokenizer"
        )
    if theirs is not None and theirs != fingerprint:
        raise DfmError(
            f"{name} was trained with a different tokenizer (fingerprint {theirs[:12]}, ensemble "
            f"{fingerprint[:12]}): retrain it on this run's tokenizer"
        )


class SubsetRouter(torch.nn.Module):
    """A router restricted to the experts that are present (missing experts dropped)."""

    def __init__(self, router: Router, kept: Sequence[int]) -> None:
        super().__init__()
        self.inner = router
        self.register_buffer("kept", torch.tensor(list(kept)), persistent=False)
        self.config = type(router.config)(**{**router.config.to_dict(), "num_experts": len(kept)})

    @property
    def num_parameters(self) -> int:
        return self.inner.num_parameters

    def new_cache(self):
        return self.inner.new_cache()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, cache=None) -> Tensor:
        return self.inner(input_ids, attention_mask, cache=cache)[..., self.kept]
