"""Continuous batching for `dfm serve`: one decoding batch shared by every request in flight.

A request is one or more rows (``n`` choices of one prompt). Rows join the batch at the next
step and leave when they end (EOS, a stop string, ``max_tokens``, cancellation), without waiting
for the others. Each row keeps its own routing (any mode of `dfm generate` but oracle; or one
expert by name), its own sampling options and its own random generator, so a row's text depends
on its own seed only, never on what it was batched with: the batch shares the experts' forward
passes (each expert runs only on the rows that give it weight) and the router's, and every
row's selection of experts and its token are drawn row by row.

The ensemble's KV caches belong to one batch, so a batch whose rows changed is rebuilt: caches
reset, every row's sequence prefilled again (left-padded), bayes rows' posteriors recomputed from
their whole sequence. Rows that ended stay in the batch as padding until the next rebuild.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dfm.decode import DecodeConfig, decode_step
from dfm.errors import DfmError
from dfm.mixing import check_k, exclude_log_weights, normalize_log_weights
from dfm.routing import Routing, Selection, parse_mode, select_experts
from dfm.sampling import check_sampling, sample_tokens
from models.ensemble import Ensemble
from models.scoring import document_bos

#: Routing modes a server row may ask for (oracle needs a true cluster: ask for an expert instead).
SERVED_MODES = ("mixture", "top1", "top2", "topk", "switch", "bayes", "centroid")


@dataclass
class RowSpec:
    """What one row asks for; checked by ``Engine.check`` before it joins."""

    prompt: list[int]  # token ids without BOS
    max_tokens: int = 16
    routing: str = "mixture"
    k: int | None = None
    exclude: tuple[int, ...] = ()
    route_on: str = "token"
    expert: int | None = None  # one expert alone (a model named expert-N)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # top log-probabilities of the mixed distribution per token
    stream: bool = False  # an event after every token (else only the last, carrying the whole row)


@dataclass
class Event:
    """A row's progress after a step: its new token and the text so far; ``finish`` on its last."""

    token: int
    text: str
    logprob: float
    top_logprobs: dict[int, float] | None
    experts: list[int]
    finish: str | None = None  # "stop" (EOS or stop string), "length", "cancelled"
    history: dict | None = None  # on the last event: every token's id, logprob, top logprobs and experts


@dataclass
class _Row:
    spec: RowSpec
    on_event: Callable[[Event], None]
    routing: Routing = Routing.MIXTURE
    k: int | None = None
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    cancelled: bool = False
    done: bool = False
    prompt_weights: Tensor | None = None  # route_on="prompt": the selected weights of its first step
    log_joint: Tensor | None = None  # bayes: log prior + the experts' log-likelihood of the sequence
    history: dict = field(default_factory=lambda: {"tokens": [], "logprobs": [], "top": [], "experts": []})


class Engine:
    """The decoding loop of one ensemble (or one model as a one-expert ensemble), in its own thread."""

    def __init__(
        self,
        ensemble: Ensemble,
        *,
        max_batch: int = 16,
        partition=None,
        name: str = "dfm",
        patience: int = 8,
        wake: threading.Event | None = None,
    ) -> None:
        if ensemble.tokenizer is None or ensemble.tokenizer.eos_token_id is None:
            raise DfmError("the ensemble needs a tokenizer with an EOS token: load it with Ensemble.from_run")
        if max_batch < 1:
            raise DfmError(f"--max-batch must be at least 1, got {max_batch}")
        self.ensemble, self.max_batch, self.partition, self.name = ensemble, max_batch, partition, name
        tokenizer = ensemble.tokenizer
        self.eos_id, self.bos_id = tokenizer.eos_token_id, document_bos(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        sizes = [e.config.max_position_embeddings for e in ensemble.experts]
        if ensemble.router is not None:
            sizes.append(ensemble.router.config.max_positions)
        self.context = min(sizes)
        self._waiting: list[_Row] = []
        self.patience, self._waited = patience, 0  # steps a waiting row may wait for others to join with
        self._rows: list[_Row] = []
        self._lock = threading.Lock()
        self.wake = wake if wake is not None else threading.Event()  # set when there is work
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.stats = {
            "steps": 0,
            "row_steps": 0,
            "tokens": 0,
            "rebuilds": 0,
            "requests": 0,
            "cancelled": 0,
            "busy_seconds": 0.0,
        }
        self.expert_tokens = [0] * ensemble.num_experts

    # --- requests --------------------------------------------------------------------------
    def check(self, spec: RowSpec) -> None:
        """Refuse what this engine cannot serve, with a message a client can act on."""
        if spec.routing not in SERVED_MODES:
            raise DfmError(f"unknown routing {spec.routing!r}: choose one of {', '.join(SERVED_MODES)}")
        routing, k = parse_mode(spec.routing)
        k = spec.k if spec.k is not None else k
        if routing is Routing.TOPK or (routing is Routing.CENTROID and k is not None):
            check_k(1 if k is None else k, self.ensemble.num_experts)
        elif spec.k is not None:
            raise DfmError(f"k applies to topk and centroid routing only, not {spec.routing}")
        if routing is Routing.CENTROID and self.partition is None:
            raise DfmError("centroid routing needs the run's partition (RUN/partition)")
        needs_router = routing in (Routing.MIXTURE, Routing.TOPK, Routing.SWITCH) and spec.expert is None
        if needs_router and self.ensemble.router is None:
            if self.ensemble.num_experts > 1:
                raise DfmError("this run has no router: use routing bayes or centroid, or a model named expert-N")
        if spec.route_on not in ("token", "prompt"):
            raise DfmError(f"route_on must be 'token' or 'prompt', got {spec.route_on!r}")
        exclude_log_weights(torch.zeros(1, self.ensemble.num_experts, dtype=torch.float64), spec.exclude)
        if spec.expert is not None and spec.expert in spec.exclude:
            raise DfmError(f"expert {spec.expert} is the model asked for and also in exclude_experts: drop one of them")
        check_sampling(spec.temperature, spec.top_k, spec.top_p)
        if spec.max_tokens < 1:
            raise DfmError(f"max_tokens must be at least 1, got {spec.max_tokens}")
        if spec.max_tokens >= self.context:
            raise DfmError(f"max_tokens {spec.max_tokens} leaves no room for a prompt in the context of {self.context}")
        if len(spec.prompt) + spec.max_tokens > self.context:
            raise DfmError(
                f"the prompt has {len(spec.prompt)} tokens and max_tokens is {spec.max_tokens}: together more than "
                f"the context of {self.context} tokens; shorten the prompt or lower max_tokens"
            )
        bad = [i for i in spec.prompt if not 0 <= i < self.ensemble.vocab_size]
        if bad:
            raise DfmError(f"prompt token ids {bad[:5]} are outside the vocabulary of {self.ensemble.vocab_size}")

    def submit(self, specs: Sequence[RowSpec], on_event: Callable[[int, Event], None]) -> Callable[[], None]:
        """Queue the rows of one request; ``on_event(i, event)`` is called from the engine's thread
        for row i. Returns a function that cancels every row of the request."""
        for spec in specs:
            self.check(spec)
        rows = []
        for i, spec in enumerate(specs):
            routing, k = parse_mode(spec.routing)
            row = _Row(spec, lambda event, i=i: on_event(i, event), routing, spec.k if spec.k is not None else k)
            row.generator = torch.Generator(device=self.ensemble.device).manual_seed(spec.seed)
            rows.append(row)
        with self._lock:
            if self._stopping:
                raise DfmError("the server is shutting down")
            self._waiting.extend(rows)
            self.stats["requests"] += 1
        self.wake.set()

        def cancel() -> None:
            for row in rows:
                row.cancelled = True

        return cancel

    # --- the loop --------------------------------------------------------------------------
    def start(self) -> None:
        """Decode in a thread of its own (tests, in-process use); `dfm serve` calls ``run_engines``
        on its main thread instead, where torch's small per-token operations run faster."""
        self._thread = threading.Thread(target=run_engines, args=([self], self._stopped), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish nothing new; cancel what is left and end the thread."""
        with self._lock:
            self._stopping = True
            for row in self._waiting + self._rows:
                row.cancelled = True
        self.wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _stopped(self) -> bool:
        return self._stopping and not self._waiting and not any(not r.done for r in self._rows)

    @property
    def occupancy(self) -> float:
        """Mean live rows per decoding step since the start."""
        return self.stats["row_steps"] / self.stats["steps"] if self.stats["steps"] else 0.0

    def work_once(self) -> bool:
        """One decoding step of the batch (admitting waiting rows, dropping ended ones); False when
        there was nothing to do."""
        with self._lock:
            live = [r for r in self._rows if not r.done and not r.cancelled]
            room = self.max_batch - len(live)
            if self._admit(len(live), room):
                joining = self._joining(live, room)
                self._waiting = self._waiting[len(joining) :]
            else:
                joining = []
                self._waited += bool(self._waiting)
        for row in (r for r in self._rows if not r.done and r.cancelled):
            self._finish(row, "cancelled")
        joining = [r for r in joining if not self._cancelled(r)]
        live = [r for r in self._rows if not r.done]
        if not live and not joining:
            self._rows = []
            return False
        rebuild = bool(joining) or len(self._rows) > 2 * max(1, len(live))
        started = time.perf_counter()
        try:
            self._step(live + joining, rebuild)
        except Exception as err:  # a bug or an exhausted device: end those rows, keep serving
            for row in live + joining:
                if not row.done:
                    self._emit(row, Event(self.pad_id, "", 0.0, None, [], finish=f"error: {err}"))
                    row.done = True
            self._rows = []
        self.stats["busy_seconds"] += time.perf_counter() - started
        return True

    def _admit(self, live: int, room: int) -> bool:
        """Whether the waiting rows join at this step. Joining rebuilds the batch (every row's
        sequence prefilled again), so rows join in groups: at once into an empty batch, when half
        the batch is free, or when the first of them has waited ``patience`` steps."""
        if not self._waiting or room <= 0:
            return False
        if live == 0 or room >= max(1, self.max_batch // 2) or self._waited >= self.patience:
            self._waited = 0
            return True
        return False

    def _joining(self, live: list[_Row], room: int) -> list[_Row]:
        """The waiting rows that join now, first come first served: as many as there is room for
        while the left-padded batch still fits the context (a row that does not waits for the
        batch to drain, and the rows behind it with it)."""
        joining: list[_Row] = []
        for row in self._waiting[:room]:
            if not self._fits([*live, *joining, row]):
                break
            joining.append(row)
        return joining

    def _fits(self, rows: list[_Row]) -> bool:
        """Whether ``rows`` decode together within the context: the longest sequence, left-padded,
        plus the most tokens any row still adds, less the last token (never fed back)."""
        longest = max(1 + len(r.spec.prompt) + len(r.generated) for r in rows)
        return longest + max(r.spec.max_tokens - len(r.generated) for r in rows) - 1 <= self.context

    def _emit(self, row: _Row, event: Event) -> None:
        """Hand ``event`` to the row's listener; a listener that fails (its client and loop gone)
        cancels the row instead of stopping the engine."""
        try:
            row.on_event(event)
        except Exception:  # noqa: BLE001 - whatever the listener raises, the other rows go on
            row.cancelled = True

    def _cancelled(self, row: _Row) -> bool:
        if row.cancelled:
            self._finish(row, "cancelled")
        return row.cancelled

    def _finish(self, row: _Row, reason: str) -> None:
        row.done = True
        self.stats["cancelled"] += reason == "cancelled"
        self._emit(row, Event(self.pad_id, self._text(row), 0.0, None, [], finish=reason, history=row.history))

    def _text(self, row: _Row) -> str:
        ids = row.generated[:-1] if row.generated and row.generated[-1] == self.eos_id else row.generated
        return self.ensemble.tokenizer.decode(ids, skip_special_tokens=False)

    def _batch(self, rows: list[_Row]) -> None:
        """Left-padded sequences of ``rows`` in buffers with room for every token they may add."""
        sequences = [[self.bos_id, *r.spec.prompt, *r.generated] for r in rows]
        width = max(len(s) for s in sequences)
        room = max(r.spec.max_tokens - len(r.generated) for r in rows)
        tokens = torch.full((len(rows), width + room), self.pad_id, dtype=torch.long)
        mask = torch.ones((len(rows), width + room), dtype=torch.long)
        for i, s in enumerate(sequences):
            tokens[i, width - len(s) : width] = torch.tensor(s)
            mask[i, : width - len(s)] = 0
        self._buffer, self._mask_buffer = tokens.to(self.ensemble.device), mask.to(self.ensemble.device)
        self._length = width

    def _step(self, rows: list[_Row], rebuild: bool) -> None:
        ensemble = self.ensemble
        if rebuild:
            self._rows = rows
            self._batch(rows)
            ensemble.reset()
            # one model without a router (the baseline) weighs its rows with its prior: weight 1
            has_weigher = ensemble.router is not None or ensemble.num_experts == 1
            self._router = ensemble.router_weigher() if has_weigher else None
            self.stats["rebuilds"] += 1
        rows, length = self._rows, self._length
        tokens, mask = self._buffer[:, :length], self._mask_buffer[:, :length]
        if rebuild and any(r.routing is Routing.BAYES for r in rows):
            evidence = ensemble.prefix_log_likelihood(tokens, mask, range(ensemble.num_experts))
            for r, ll in zip(rows, evidence):
                if r.routing is Routing.BAYES:
                    r.log_joint = ensemble.log_prior.to(ll.device) + ll.double()
        live = [i for i, r in enumerate(rows) if not r.done]
        needs_router = any(
            rows[i].routing in (Routing.MIXTURE, Routing.TOPK, Routing.SWITCH)
            and rows[i].spec.expert is None
            and rows[i].prompt_weights is None
            for i in live
        )
        router = self._router(tokens, mask) if needs_router and self._router is not None else None
        centroid = None
        if any(rows[i].routing is Routing.CENTROID and rows[i].prompt_weights is None for i in live):
            centroid = ensemble.weigher("centroid", partition=self.partition)(tokens, mask)
        used = self._selection(rows, live, router, centroid)
        out = decode_step(ensemble, tokens, mask, used, DecodeConfig(temperature=0.0))
        chosen = out.token.clone()  # greedy rows keep the argmax decode_step drew
        for i in live:
            spec = rows[i].spec
            if spec.temperature != 0:
                chosen[i] = sample_tokens(
                    out.log_probs[i : i + 1], rows[i].generator, spec.temperature, spec.top_k, spec.top_p
                )[0]
        chosen_log_probs = out.log_probs.gather(-1, chosen.unsqueeze(-1)).squeeze(-1).tolist()
        finite = torch.isfinite(used.log_weights).tolist()
        ids = chosen.tolist()
        for i in live:
            row, token = rows[i], ids[i]
            spec = row.spec
            experts = [e for e in used.active if finite[i][e]]
            if row.routing is Routing.BAYES:
                picked = out.expert_log_probs[i, :, token].double()
                row.log_joint[used.active] += picked.to(row.log_joint.device)
            for e in experts:
                self.expert_tokens[e] += 1
            row.generated.append(token)
            top = None
            if spec.logprobs:
                values, top_ids = out.log_probs[i].float().topk(min(spec.logprobs, out.log_probs.shape[-1]))
                top = dict(zip(top_ids.tolist(), values.tolist()))
            for key, value in zip(("tokens", "logprobs", "top", "experts"), (token, chosen_log_probs[i], top, experts)):
                row.history[key].append(value)
            finish = None
            text = self._text(row) if spec.stream or spec.stop else ""
            if token == self.eos_id:
                finish = "stop"
            elif any(s in text for s in spec.stop):
                finish = "stop"
                text = text[: min(text.index(s) for s in spec.stop if s in text)]
            elif len(row.generated) >= spec.max_tokens:
                finish = "length"
            row.done = finish is not None
            if finish is not None and not spec.stop:
                text = self._text(row)
            if spec.stream or finish is not None:
                history = row.history if finish is not None else None
                self._emit(row, Event(token, text, chosen_log_probs[i], top, experts, finish, history))
        self._buffer[:, length] = chosen
        self._length = length + 1
        self.stats["steps"] += 1
        self.stats["row_steps"] += len(live)
        self.stats["tokens"] += len(live)

    def _selection(self, rows: list[_Row], live: list[int], router, centroid) -> Selection:
        """Every row's weights, routed and sparsified row by row (its own generator for switch)."""
        num_experts = self.ensemble.num_experts
        weights = torch.full((len(rows), num_experts), float("-inf"), dtype=torch.float64)
        plain: dict[tuple, list[int]] = {}  # rows routed by the router alone, deterministically: at once
        for i in live:
            row = rows[i]
            spec = row.spec
            if (
                router is not None
                and row.routing in (Routing.MIXTURE, Routing.TOPK)
                and spec.expert is None
                and not spec.exclude
                and spec.route_on == "token"
            ):
                plain.setdefault((row.routing, row.k), []).append(i)
                continue
            if row.prompt_weights is not None:  # route_on="prompt": the first step's selection, kept
                weights[i] = row.prompt_weights
                continue
            if spec.expert is not None:
                routed = torch.full((1, num_experts), float("-inf"), dtype=torch.float64)
                routed[0, spec.expert] = 0.0
            elif row.routing is Routing.BAYES:
                routed = normalize_log_weights(row.log_joint.cpu()[None])
            elif row.routing is Routing.CENTROID:
                routed = centroid[i : i + 1].cpu()
            else:
                routed = router[i : i + 1].cpu()
            if spec.exclude:
                routed = exclude_log_weights(routed, spec.exclude)
            weights[i] = select_experts(routed, row.routing, row.k, row.generator).log_weights[0]
            if spec.route_on == "prompt":
                row.prompt_weights = weights[i].clone()
        for (routing, k), members in plain.items():
            weights[members] = select_experts(router[members].cpu(), routing, k).log_weights
        live_active = torch.isfinite(weights[live]).any(0).nonzero().flatten().tolist() if live else [0]
        for i, row in enumerate(rows):
            if i not in live:  # padding rows run the cheapest expert already running
                weights[i, live_active[0]] = 0.0
        weights = weights.to(self.ensemble.device)
        return Selection(weights, torch.isfinite(weights).any(0).nonzero().flatten().tolist())


def run_engines(engines: Sequence[Engine], stop: Callable[[], bool]) -> None:
    """Step every engine in turn until ``stop()``; sleeps on the engines' wake event when idle
    (engines stepped together share one)."""
    torch.set_grad_enabled(False)
    wake = engines[0].wake
    while not stop():
        wake.clear()
        worked = False
        for engine in engines:
            worked = engine.work_once() or worked
        if not worked:
            wake.wait(timeout=0.1)
