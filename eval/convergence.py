"""Exact convergence of the decentralized masked-path sampler: how far its N-step output is from
the source, as a function of the number of steps N and of the router's error eps.

The toy (``MaskedToy``) is small enough to enumerate: K known sources, each a seeded first-order
Markov chain over V tokens and L positions, with priors pi_k; the true source is
P = sum_k pi_k P_k. Expert k is exact (its posterior of a clean token given a masked state X_t is
the conditional of P_k given X_t's revealed tokens), and the router is the exact posterior
P(k | X_t) ∝ pi_k P_k(revealed tokens) blended with the uniform distribution:
w = (1 - eps) * posterior + eps / K.

``sampler_distribution`` computes, exactly and in float64, the distribution over the V^L clean
sequences that ``dfm.masked_sampler.euler_sample`` outputs from the all-masked state in N steps
(times linspace(0, 1, N + 1); every masked position revealed independently with probability
reveal_probability(t_j, t_{j+1}), all of them at the last step), by pushing a distribution over
the (V + 1)^L masked states through the steps. A step from X to X' (X' fills some masked
positions of X) has probability r^a (1 - r)^m' B(X -> X'), a the positions revealed, m' the
positions still masked and B the probability of the revealed values, which does not depend on
the step:

* ``mixture``: B = prod_i q(x'_i | X), q = sum_k w_k p_k mixed in log space;
* ``switch``:  B = sum_k w_k prod_i p_k(x'_i | X) (one expert per step draws every reveal);
* ``top1``:    B = prod_i p_k*(x'_i | X) with k* the router's argmax expert.

Only the (2V + 1)^L pairs (X, X') with X' extending X have B > 0, so a step costs a few sparse
operations. ``one_per_step_distribution`` runs the schedule that reveals one uniformly chosen
masked position per step (L steps): with exact experts and router it outputs P exactly (the
decomposition theorem), under both mixture and switch.

The default toy is V = 3, L = 5 (1024 states, 243 sequences), K = 3, seed 0; the default grid
(every N in 1..64, eps in 0, 0.01, 0.03, 0.1, 0.3, mixture and switch) runs in about 4 seconds
on one CPU core. ``convergence_study`` reports TV and KL(P || sampler) on the grid and two fitted
exponents (see its docstring).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from dfm.atomic import atomic_file, write_json
from dfm.errors import DfmError
from dfm.masked_path import MaskedPath
from dfm.mixing import mix_log_probs
from dfm.schedulers import scheduler

#: routing modes of the exact sampler (``top1``: top-k routing with k = 1, the router's argmax expert, ties to
#: the lower index; the mode names of `dfm eval`)
ROUTINGS = ("mixture", "switch", "top1")
#: the study's modes, reported under "modes"; the first is also reported at the top level
STUDY_MODES = ("mixture", "switch")
DEFAULT_STEPS = tuple(range(1, 65))
DEFAULT_EPS = (0.0, 0.01, 0.03, 0.1, 0.3)


@dataclass(frozen=True, eq=False)
class MaskedToy:
    """K sources over the V^L clean sequences (row-major: sequence y has index sum_i y_i V^(L-1-i)).

    ``sources`` (K, V^L) are distributions with full support, ``priors`` (K,) sum to one; ``seed``
    records how ``random`` made them (None for a toy built by hand).
    """

    sources: Tensor
    priors: Tensor
    vocab_size: int
    length: int
    seed: int | None = None

    def __post_init__(self) -> None:
        _check_size(self.vocab_size, self.length)
        num = self.vocab_size**self.length
        if self.sources.dim() != 2 or self.sources.shape[1] != num or self.priors.shape != self.sources.shape[:1]:
            raise DfmError(
                f"pass sources of shape (K, {num}) and priors of shape (K,), "
                f"got {tuple(self.sources.shape)} and {tuple(self.priors.shape)}"
            )
        if not ((self.sources > 0).all() and torch.allclose(self.sources.sum(1), torch.ones(()).double())):
            raise DfmError("pass sources that give every sequence a positive probability and sum to one")
        if not ((self.priors >= 0).all() and math.isclose(float(self.priors.sum()), 1.0)):
            raise DfmError("pass priors that are non-negative and sum to one")

    @classmethod
    def random(
        cls, seed: int = 0, vocab_size: int = 3, length: int = 5, num_sources: int = 3, sharpness: float = 2.0
    ) -> MaskedToy:
        """K seeded first-order Markov chains: start and transition probabilities softmax(sharpness * N(0, 1));
        priors softmax(0.5 * N(0, 1)). A larger ``sharpness`` makes the chains peakier and more distinct."""
        _check_size(vocab_size, length)
        if num_sources < 1:
            raise DfmError(f"pass num_sources >= 1, got {num_sources}")
        g = torch.Generator().manual_seed(seed)
        v = vocab_size
        start = (sharpness * torch.randn(num_sources, v, generator=g, dtype=torch.float64)).softmax(-1)
        step = (sharpness * torch.randn(num_sources, v, v, generator=g, dtype=torch.float64)).softmax(-1)
        priors = (0.5 * torch.randn(num_sources, generator=g, dtype=torch.float64)).softmax(-1)
        seqs = _grid(v, length)
        log_p = start[:, seqs[:, 0]].log()
        for i in range(1, length):
            log_p = log_p + step[:, seqs[:, i - 1], seqs[:, i]].log()
        return cls(log_p.exp(), priors, vocab_size, length, seed)

    @property
    def num_sources(self) -> int:
        return self.sources.shape[0]

    @property
    def num_states(self) -> int:
        return (self.vocab_size + 1) ** self.length

    def sequences(self) -> Tensor:
        """(V^L, L): every clean sequence, in the index order of ``sources``."""
        return _grid(self.vocab_size, self.length)

    def states(self) -> Tensor:
        """(S, L), S = (V + 1)^L: every masked state (symbol V = mask), row-major; the last is all-masked."""
        return _grid(self.vocab_size + 1, self.length)

    def state_index(self, xt: Tensor) -> Tensor:
        """The row of ``states()`` of each masked state in ``xt`` (B, L)."""
        return _encode(xt, self.vocab_size + 1)

    def sequence_index(self, x1: Tensor) -> Tensor:
        """The index of each clean sequence in ``x1`` (B, L)."""
        return _encode(x1, self.vocab_size)

    def target(self) -> Tensor:
        """(V^L,) the true source P = sum_k pi_k P_k."""
        return self.priors @ self.sources

    def expert_log_posteriors(self) -> Tensor:
        """(S, K, L, V): log p_k(x1_i = v | X_t) for every state, by enumeration (one-hot at revealed positions)."""
        onehot = torch.nn.functional.one_hot(self.sequences(), self.vocab_size).double()  # (V^L, L, V)
        joint = torch.einsum("sy,ky,yiv->skiv", self._agrees(), self.sources, onehot)
        return (joint / joint.sum(-1, keepdim=True)).log()

    def router_log_weights(self, eps: float) -> Tensor:
        """(S, K): log of (1 - eps) P(k | X_t) + eps / K, with P(k | X_t) ∝ pi_k P_k(revealed tokens of X_t)."""
        _check_eps(eps)
        joint = self._agrees() @ (self.priors[:, None] * self.sources).T  # (S, K): pi_k P_k(revealed tokens)
        posterior = joint / joint.sum(-1, keepdim=True)
        return ((1 - eps) * posterior + eps / self.num_sources).log()

    def _agrees(self) -> Tensor:
        """(S, V^L): 1 where the clean sequence has the state's revealed tokens."""
        states, seqs = self.states()[:, None, :], self.sequences()[None]
        return ((states == self.vocab_size) | (states == seqs)).all(-1).double()

    def describe(self) -> dict:
        """V, L, K, priors and seed, for a report."""
        return {
            "vocab_size": self.vocab_size,
            "length": self.length,
            "num_sources": self.num_sources,
            "priors": self.priors.tolist(),
            "seed": self.seed,
        }


def _check_size(vocab_size: int, length: int) -> None:
    if not (1 <= vocab_size <= 4 and 1 <= length <= 5):
        raise DfmError(
            f"the exact study enumerates (V + 1)^L states: pass 1 <= vocab_size <= 4 and "
            f"1 <= length <= 5, got {vocab_size} and {length}"
        )


def _grid(base: int, length: int) -> Tensor:
    """(base^length, length): every digit string, row-major."""
    return torch.cartesian_prod(*[torch.arange(base)] * length).reshape(-1, length)


def _encode(digits: Tensor, base: int) -> Tensor:
    powers = base ** torch.arange(digits.shape[-1] - 1, -1, -1, device=digits.device)
    return (digits * powers).sum(-1)


@dataclass(frozen=True)
class _Moves:
    """Every pair (X, X') of masked states with X' extending X, (2V + 1)^L of them."""

    src: Tensor  # (P,) state index of X
    dst: Tensor  # (P,) state index of X'
    revealed: Tensor  # (P, L) True where X' reveals a position X masks
    value: Tensor  # (P, L) X'_i clamped to a token (meaningful where ``revealed``)
    num_revealed: Tensor  # (P,) a
    masked_before: Tensor  # (P,) positions X masks
    masked_after: Tensor  # (P,) positions X' masks


@lru_cache(maxsize=8)
def _moves(vocab_size: int, length: int) -> _Moves:
    mask = vocab_size
    # one digit per position: token v kept (v < V), mask kept (V), or mask -> token (V + 1 + v)
    before = torch.tensor(list(range(vocab_size)) + [mask] * (vocab_size + 1))
    after = torch.tensor(list(range(vocab_size)) + [mask] + list(range(vocab_size)))
    codes = _grid(2 * vocab_size + 1, length)
    x, x_next = before[codes], after[codes]
    revealed = (x == mask) & (x_next != mask)
    masked_before, masked_after = (x == mask).sum(-1), (x_next == mask).sum(-1)
    return _Moves(
        _encode(x, mask + 1),
        _encode(x_next, mask + 1),
        revealed,
        x_next.clamp(max=vocab_size - 1),
        revealed.sum(-1),
        masked_before,
        masked_after,
    )


def _check_eps(eps: float) -> None:
    if not 0.0 <= eps <= 1.0:
        raise DfmError(f"router error eps must be in [0, 1], got {eps}")


def _move_values(toy: MaskedToy, eps: float, routing: str) -> Tensor:
    """(P,) B(X -> X') of every move: the probability of the revealed values (module docstring)."""
    if routing not in ROUTINGS:
        raise DfmError(f"unknown routing {routing!r} for the exact sampler; pass one of: {', '.join(ROUTINGS)}")
    log_p, log_w = toy.expert_log_posteriors(), toy.router_log_weights(eps)
    if routing == "top1":
        log_w = torch.full_like(log_w, float("-inf")).scatter(-1, log_w.argmax(-1, keepdim=True), 0.0)
    if routing != "switch":  # one per-position posterior: the mixture (of one expert for top1)
        log_p, log_w = mix_log_probs(log_p, log_w).unsqueeze(1), torch.zeros(log_w.shape[0], 1, dtype=torch.float64)
    moves = _moves(toy.vocab_size, toy.length)
    positions = torch.arange(toy.length)
    per_position = log_p[moves.src[:, None], :, positions, moves.value]  # (P, L, K)
    per_position = torch.where(moves.revealed[..., None], per_position, torch.zeros(()).double())
    return torch.logsumexp(per_position.sum(1) + log_w[moves.src], dim=-1).exp()


def _push(toy: MaskedToy, step_probs: Sequence[Tensor]) -> Tensor:
    """The clean-sequence distribution after the steps (each (P,) move probabilities) from all-masked."""
    moves = _moves(toy.vocab_size, toy.length)
    dist = torch.zeros(toy.num_states, dtype=torch.float64)
    dist[-1] = 1.0
    for probs in step_probs:
        dist = torch.zeros_like(dist).index_add_(0, moves.dst, dist[moves.src] * probs)
    return dist[toy.state_index(toy.sequences())]


def _reveal_probabilities(steps: int, scheduler_name: str) -> list[float]:
    """r_j of euler_sample's steps: reveal_probability(t_j, t_{j+1}), and 1 at the last step."""
    if int(steps) != steps or steps < 1:
        raise DfmError(f"pass a whole number of steps >= 1, got {steps}")
    path = MaskedPath(1, scheduler(scheduler_name))
    times = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    return [float(path.reveal_probability(times[j], times[j + 1])) for j in range(steps - 1)] + [1.0]


def _euler_distribution(toy: MaskedToy, values: Tensor, reveal: Sequence[float]) -> Tensor:
    """Push through steps of reveal probabilities r: move probability B r^a (1 - r)^m'."""
    moves = _moves(toy.vocab_size, toy.length)
    powers = torch.arange(toy.length + 1, dtype=torch.float64)
    cell = moves.num_revealed * (toy.length + 1) + moves.masked_after  # index into the (a, m') table
    return _push(toy, [values * torch.outer(r**powers, (1 - r) ** powers).flatten()[cell] for r in reveal])


def sampler_distribution(
    toy: MaskedToy, steps: int, eps: float, routing: str, scheduler_name: str = "linear"
) -> Tensor:
    """(V^L,) exact distribution of euler_sample's output in ``steps`` steps from all-masked, with
    exact experts and a router of error ``eps`` under ``routing`` (one of ROUTINGS)."""
    reveal = _reveal_probabilities(steps, scheduler_name)
    return _euler_distribution(toy, _move_values(toy, eps, routing), reveal)


def one_per_step_distribution(toy: MaskedToy, eps: float, routing: str) -> Tensor:
    """(V^L,) exact output of the schedule that reveals one uniformly chosen masked position per step (L steps)."""
    moves = _moves(toy.vocab_size, toy.length)
    single = (moves.num_revealed == 1).double() / moves.masked_before.clamp(min=1)
    probs = _move_values(toy, eps, routing) * single
    return _push(toy, [probs] * toy.length)


def total_variation(p: Tensor, q: Tensor) -> float:
    """TV(p, q) = sum |p - q| / 2."""
    return 0.5 * float((p - q).abs().sum())


def kl_divergence(p: Tensor, q: Tensor) -> float:
    """KL(p || q) in nats: terms with p = 0 count 0; p > 0 where q = 0 gives inf."""
    support = p > 0
    return float((p[support] * (p[support].log() - q[support].log())).sum())


def _slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of log y on log x."""
    lx, ly = torch.tensor(x, dtype=torch.float64).log(), torch.tensor(y, dtype=torch.float64).log()
    lx = lx - lx.mean()
    return float((lx * (ly - ly.mean())).sum() / (lx * lx).sum())


def _mode_results(
    toy: MaskedToy, routing: str, steps: list[int], eps: list[float], reveal: dict[int, list[float]]
) -> dict:
    """The grid and the two rates of one routing mode (convergence_study's docstring)."""
    target = toy.target()
    tv, kl = [[0.0] * len(eps) for _ in steps], [[0.0] * len(eps) for _ in steps]
    for j, e in enumerate(eps):
        values = _move_values(toy, e, routing)
        for i, n in enumerate(steps):
            dist = _euler_distribution(toy, values, reveal[n])
            tv[i][j], kl[i][j] = total_variation(target, dist), kl_divergence(target, dist)
    zero, last = eps.index(0.0), steps.index(max(steps))
    fit_steps, fit_eps = [n for n in steps if n >= 2], [e for e in eps if e > 0]
    excess = [tv[last][eps.index(e)] - tv[last][zero] for e in fit_eps]
    return {
        "tv": {"steps": steps, "eps": eps, "values": tv},
        "kl": {"steps": steps, "eps": eps, "values": kl},
        "rate_in_steps": -_slope(fit_steps, [tv[steps.index(n)][zero] for n in fit_steps]),
        "rate_in_eps": _slope(fit_eps, excess) if min(excess) > 0 else float("nan"),
        # the schedule revealing one position per step: exact at eps = 0 (the decomposition theorem)
        "one_position_per_step_tv": {
            "eps": eps,
            "values": [total_variation(target, one_per_step_distribution(toy, e, routing)) for e in eps],
        },
    }


def convergence_study(
    steps: Sequence[int] = DEFAULT_STEPS,
    eps: Sequence[float] = DEFAULT_EPS,
    *,
    toy: MaskedToy | None = None,
    scheduler_name: str = "linear",
) -> dict:
    """TV and KL(P || sampler) on the grid of ``steps`` x ``eps`` for every mode of STUDY_MODES.

    Returns {"tv": {"steps", "eps", "values": [[per eps] per N]}, "kl": (same), "rate_in_steps",
    "rate_in_eps"} for mixture at the top level, the same four keys per mode under "modes", and
    "toy" (V, L, K, priors, seed, scheduler). ``toy`` defaults to ``MaskedToy.random()``.

    * rate_in_steps: a in TV ~ N^-a, minus the least-squares slope of log TV on log N at eps = 0 over
      the grid's N >= 2 (N = 1 reveals everything at once and sits off the asymptotic line).
    * rate_in_eps: b in (TV(N_max, eps) - TV(N_max, 0)) ~ eps^b, the least-squares slope of the log excess
      on log eps over the grid's eps > 0, at the largest N of the grid; NaN if an excess is not positive
      (a router error that happens to cancel some of the discretisation error).
    The grid needs eps = 0, two N >= 2 and two eps > 0. It runs on one torch thread (restored after):
    its tensors are so small that more threads only add synchronisation, 30x slower on a busy machine.
    """
    toy = MaskedToy.random() if toy is None else toy
    reveal = {int(n): _reveal_probabilities(n, scheduler_name) for n in steps}
    steps, eps = [int(n) for n in steps], [float(e) for e in eps]
    for e in eps:
        _check_eps(e)
    if 0.0 not in eps or len({n for n in steps if n >= 2}) < 2 or len({e for e in eps if e > 0}) < 2:
        raise DfmError("pass a grid with eps 0, at least two eps > 0 and at least two step counts >= 2")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        modes = {mode: _mode_results(toy, mode, steps, eps, reveal) for mode in STUDY_MODES}
    finally:
        torch.set_num_threads(threads)
    return {**modes[STUDY_MODES[0]], "modes": modes, "toy": {**toy.describe(), "scheduler": scheduler_name}}


def write_study(study: dict, path: str | os.PathLike) -> None:
    """Write the study as JSON, atomically."""
    write_json(path, study)


def plot_convergence(study: dict, path: str | os.PathLike) -> None:
    """Log-log TV vs N, one line per eps (one colour each): mixture solid, switch dashed. PNG, written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    styles = {"mixture": "-", "switch": "--"}
    for mode, result in study["modes"].items():
        grid = result["tv"]
        for j, e in enumerate(grid["eps"]):
            ax.plot(
                grid["steps"],
                [row[j] for row in grid["values"]],
                styles.get(mode, ":"),
                color=f"C{j}",
                label=f"{mode}, eps = {e:g}",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sampler steps N")
    ax.set_ylabel("TV(source, sampler output)")
    toy = study["toy"]
    ax.set_title(
        f"Exact masked sampler: V = {toy['vocab_size']}, L = {toy['length']}, K = {toy['num_sources']}, "
        f"{toy['scheduler']} schedule",
        fontsize=10,
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=120, bbox_inches="tight")
