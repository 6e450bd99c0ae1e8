"""A lean decoding engine for K Llama-architecture experts that share one configuration.

Why it exists: at this model size a Hugging Face forward of one token is almost all Python and
dispatch overhead (about 2 ms on a CPU core for ~1M parameters). Stacking the K experts' weights
as (K, in, out) tensors runs every linear layer of all K experts as one batched matmul, so
`mixture` and `bayes` cost about one forward instead of K, and a single expert (top-1, switch)
runs on a view of its slice with far fewer operations than the generic path. The arithmetic is
the Llama forward of transformers (RMSNorm, rotary embeddings, SDPA attention, SiLU-gated MLP);
tests check it against `LlamaForCausalLM` to float tolerance.

KV caches are preallocated per layer as (K, B, kv_heads, context, head_dim) buffers, and every
(expert, row) pair has its own filled length, so experts can fall behind and catch up
independently. When the rows of a batch route to different experts, ``forward_pairs`` runs each
expert on its own rows only, all of them in one forward: the linear layers of a group of rows
that share an expert are one matmul with that expert's weights, everything else (norms, rotary
embeddings, attention over each pair's own cache, activations) runs once for all pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel

from dfm.errors import DfmError
from dfm.tensors import positions_from_mask

# The configuration fields the engine reproduces; any other value falls back to the generic path.
_REQUIRED = {"model_type": "llama", "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
_SHAPE = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "max_position_embeddings",
    "rope_parameters",
)


def supports(experts: Sequence[PreTrainedModel]) -> bool:
    """True when every expert is a plain Llama with the same shapes (default rotary embeddings)."""
    configs = [e.config for e in experts]
    for c in configs:
        if any(getattr(c, key, None) != value for key, value in _REQUIRED.items()):
            return False
        rope = getattr(c, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default" or "rope_theta" not in rope:
            return False
        if getattr(c, "pretraining_tp", 1) != 1:
            return False
    return all(getattr(c, key, None) == getattr(configs[0], key, None) for c in configs for key in _SHAPE)


class _GroupedLinear:
    """Each pair's rows times its own expert's weight, for pairs sorted by expert, in one batched
    matmul over a stack of weights (G, in, out): when every pair has one expert, the caller passes
    that expert's slice (1, in, out) and it is a plain matmul; equal groups of all K experts are a
    view; otherwise every expert's rows are placed in a zero-padded slot block. Calls read no Python
    number (only flags and tensors), so that a compiled caller does not specialise on them."""

    def __init__(self, experts: Sequence[int], num_experts: int, width: int, device: torch.device) -> None:
        counts = [0] * num_experts
        for e in experts:
            counts[e] += 1
        self.expert = experts[0] if counts[experts[0]] == len(experts) else None  # the only expert, if one
        self.single = self.expert is not None
        self.even = len(set(counts)) == 1
        if not self.single and not self.even:
            slots, seen = [], [0] * num_experts
            for e in experts:
                slots.append(e * max(counts) + seen[e])
                seen[e] += 1
            slot = torch.tensor(slots, device=device)
            self.index = (slot.unsqueeze(1) * width + torch.arange(width, device=device)).flatten()
            # zero columns: its length, the padded row count, is read as a size (not a Python constant)
            self.padded_rows = torch.empty(num_experts * max(counts) * width, 0, device=device)

    def __call__(self, x: Tensor, weight: Tensor) -> Tensor:
        """x (P * width, in) -> (P * width, out)."""
        if self.single:
            return x @ weight[0]
        count = weight.shape[0]
        if self.even:
            return torch.bmm(x.reshape(count, x.shape[0] // count, -1), weight).flatten(0, 1)
        padded = x.new_zeros(self.padded_rows.shape[0], x.shape[1]).index_copy_(0, self.index, x)
        return torch.bmm(padded.view(count, -1, x.shape[1]), weight).flatten(0, 1).index_select(0, self.index)


class _PairCache:
    """Keys and values of a fixed list of (expert, row) pairs, one contiguous (P, kv_heads,
    context, head_dim) buffer per layer, valid up to ``filled`` columns. Columns written here
    reach the engine's per-expert caches only in ``write_back``, which must run before anything
    else reads those."""

    def __init__(
        self, pairs: tuple, flat: Tensor, keys: Sequence[Tensor], values: Sequence[Tensor], filled: int
    ) -> None:
        self.pairs, self.flat, self.filled, self.built = pairs, flat, filled, filled
        self.keys = [self._gather(k, flat, filled) for k in keys]
        self.values = [self._gather(v, flat, filled) for v in values]

    def write_back(self, keys: Sequence[Tensor], values: Sequence[Tensor]) -> None:
        """Copy the columns computed since the build into the engine's caches ``keys``/``values``."""
        columns = slice(self.built, self.filled)
        for mine, theirs in zip(self.keys + self.values, list(keys) + list(values)):
            theirs.flatten(0, 1)[self.flat, :, columns] = mine[:, :, columns]

    @staticmethod
    def _gather(cache: Tensor, flat: Tensor, filled: int) -> Tensor:
        buffer = cache.new_empty(len(flat), *cache.shape[2:])
        buffer[:, :, :filled] = cache.flatten(0, 1)[flat, :, :filled]
        return buffer

    def append(self, layer: int, k: Tensor, v: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """Write the new columns of layer ``layer`` at ``start``; views of every column so far."""
        end = start + k.shape[2]
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]


def _normalized(x: Tensor, eps: float) -> Tensor:
    """Llama's RMSNorm without its weight (folded into the next matmul), computed in float32."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), eps=eps)
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of x (..., heads, head_dim): x cos + rotate_half(x) sin."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class StackedLlama:
    """K experts' weights stacked along a leading dimension, with per-expert KV caches."""

    def __init__(self, experts: Sequence[PreTrainedModel]) -> None:
        config = experts[0].config
        self.num_experts = len(experts)
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.eps = config.rms_norm_eps
        self.context = config.max_position_embeddings

        def stack(get) -> Tensor:
            return torch.stack([get(e).detach() for e in experts])

        def stack_linear(*gets, norm=None) -> Tensor:
            """(K, in, out) so that x @ W is the layer; an RMSNorm weight before it is folded in:
            (x / rms(x) * w) @ W = (x / rms(x)) @ (w[:, None] * W)."""
            weight = torch.cat([stack(g) for g in gets], dim=1).transpose(1, 2)
            return (weight if norm is None else stack(norm).unsqueeze(2) * weight).contiguous()

        self.embed = stack(lambda e: e.get_input_embeddings().weight)
        self.head = stack_linear(lambda e: e.get_output_embeddings().weight, norm=lambda e: e.model.norm.weight)
        self.layers = []
        for i in range(config.num_hidden_layers):

            def layer(e, i=i):
                return e.model.layers[i]

            self.layers.append(
                {
                    "qkv": stack_linear(
                        lambda e: layer(e).self_attn.q_proj.weight,
                        lambda e: layer(e).self_attn.k_proj.weight,
                        lambda e: layer(e).self_attn.v_proj.weight,
                        norm=lambda e: layer(e).input_layernorm.weight,
                    ),
                    "o": stack_linear(lambda e: layer(e).self_attn.o_proj.weight),
                    "gate_up": stack_linear(
                        lambda e: layer(e).mlp.gate_proj.weight,
                        lambda e: layer(e).mlp.up_proj.weight,
                        norm=lambda e: layer(e).post_attention_layernorm.weight,
                    ),
                    "down": stack_linear(lambda e: layer(e).mlp.down_proj.weight),
                }
            )
        theta = config.rope_parameters["rope_theta"]
        device = self.embed.device
        inv_freq = 1.0 / (
            theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float, device=device) / self.head_dim)
        )
        freqs = torch.arange(self.context, dtype=torch.float, device=device).unsqueeze(1) * inv_freq
        angles = torch.cat([freqs, freqs], dim=-1)  # (context, head_dim), as transformers builds them
        # in the weights' dtype, as transformers casts them (computed in float32)
        self.cos_table, self.sin_table = angles.cos().to(self.embed.dtype), angles.sin().to(self.embed.dtype)
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self.filled: list[list[int]] = []  # [expert][row]: columns that pair has consumed
        self._views: dict[tuple[int, int], dict] = {}  # weights and caches of a group of experts
        self._last_pairs: tuple | None = None  # the pairs of the previous forward_pairs call
        self._pair_cache: _PairCache | None = None
        self._has_padding: bool | None = None  # of the current batch, once known
        self._compiled: tuple[Callable, Callable] | None = None  # see compile()

    def compile(self) -> None:
        """Run each layer's arithmetic around attention (RMSNorm, projections, rotary embeddings,
        the MLP) of one-token decoding steps through ``torch.compile`` with dynamic shapes; caches,
        attention and prompt prefill stay eager. Compiling takes seconds per new shape, and what it
        gains depends on the device: on a CPU it is slower (the README's Performance section)."""
        self._compiled = (
            torch.compile(self._block_input, dynamic=True),
            torch.compile(self._block_output, dynamic=True),
        )

    def _blocks(self, new: int) -> tuple[Callable, Callable]:
        """The per-layer functions for a step of ``new`` tokens: compiled for one token after ``compile``."""
        if new == 1 and self._compiled is not None:
            return self._compiled
        return self._block_input, self._block_output

    def reset(self, batch_size: int) -> None:
        """Empty every expert's cache for a new batch of ``batch_size`` sequences."""
        shape = (self.num_experts, batch_size, self.kv_heads, self.context, self.head_dim)
        self.keys = [self.embed.new_zeros(shape) for _ in self.layers]
        self.values = [self.embed.new_zeros(shape) for _ in self.layers]
        self.filled = [[0] * batch_size for _ in range(self.num_experts)]
        self._views = {}
        self._last_pairs, self._pair_cache = None, None
        self._has_padding = None

    def _group(self, experts: slice) -> dict:
        """Views of the weights and caches of a contiguous group of experts, made once per batch:
        slicing a dozen tensors on every token costs more than the arithmetic at this size."""
        key = (experts.start, experts.stop)
        if key not in self._views:
            self._views[key] = {
                "embed": self.embed[experts],
                "head": self.head[experts],
                "layers": [{name: weight[experts] for name, weight in layer.items()} for layer in self.layers],
                "keys": [k[experts] for k in self.keys],
                "values": [v[experts] for v in self.values],
            }
        return self._views[key]

    def forward(self, experts: slice, input_ids: Tensor, attention_mask: Tensor, all_logits: bool = False) -> Tensor:
        """Feed ``input_ids`` (B, T) to the experts of the contiguous range ``experts``, which must
        all have consumed the same number of columns of ``attention_mask`` (B, filled + T).

        Returns logits (E, B, T, V), or (E, B, 1, V) for the last position unless ``all_logits``.
        """
        self._drop_pair_cache()  # this reads the per-expert caches
        count = experts.stop - experts.start
        group = self._group(experts)
        start = self.filled[experts.start][0]
        batch, new = input_ids.shape
        end = start + new
        if end > self.context:
            raise DfmError(f"sequence of {end} tokens exceeds the experts' context of {self.context}")
        positions = positions_from_mask(attention_mask)[:, start:end]
        cos, sin = self.cos_table[positions].unsqueeze(2), self.sin_table[positions].unsqueeze(2)  # (B, T, 1, hd)
        mask = self._attention_mask(attention_mask[:, :end], start, count, self._padded(attention_mask))

        x = group["embed"][:, input_ids].reshape(count, batch * new, -1)
        block_input, block_output = self._blocks(new)
        for layer, keys, values in zip(group["layers"], group["keys"], group["values"]):
            q, k, v = block_input(x, layer["qkv"], torch.bmm, (count, batch), new, cos, sin)
            keys[:, :, :, start:end] = k.reshape(count, batch, self.kv_heads, new, self.head_dim)
            values[:, :, :, start:end] = v.reshape(count, batch, self.kv_heads, new, self.head_dim)
            attended = self._attend(q, keys[:, :, :, :end].flatten(0, 1), values[:, :, :, :end].flatten(0, 1), mask)
            x = block_output(x, attended, layer, torch.bmm)
        x = x.reshape(count, batch, new, -1)
        if not all_logits:
            x = x[:, :, -1:]
        logits = torch.bmm(_normalized(x, self.eps).flatten(1, 2), group["head"]).reshape(count, batch, x.shape[2], -1)
        for e in range(experts.start, experts.stop):
            self.filled[e] = [end] * batch
        return logits

    def forward_pairs(
        self, experts: Sequence[int], rows: Sequence[int], input_ids: Tensor, attention_mask: Tensor
    ) -> Tensor:
        """Bring every (``experts[i]``, ``rows[i]``) pair up to the last column of ``input_ids`` /
        ``attention_mask`` (B, L) and return its next-token logits (P, V).

        Pairs must be sorted by expert. They all read from the earliest column any of them lacks;
        a pair that had more already computes those columns again (same keys and values).
        """
        count, length = len(experts), input_ids.shape[1]
        if length > self.context:
            raise DfmError(f"sequence of {length} tokens exceeds the experts' context of {self.context}")
        start = min(self.filled[e][r] for e, r in zip(experts, rows))
        new = length - start
        device = input_ids.device
        expert_ids = torch.tensor(experts, device=device)
        row_ids = torch.tensor(rows, device=device)
        flat = expert_ids * len(self.filled[0]) + row_ids  # index into caches viewed as (K * B, ...)
        linear = _GroupedLinear(experts, self.num_experts, new, device)
        weights = (
            self._group(slice(linear.expert, linear.expert + 1))
            if linear.single
            else {"layers": self.layers, "head": self.head}
        )
        block_input, block_output = self._blocks(new)

        ids = input_ids[row_ids, start:]
        positions = positions_from_mask(attention_mask)[row_ids, start:]
        cos, sin = self.cos_table[positions].unsqueeze(2), self.sin_table[positions].unsqueeze(2)  # (P, T, 1, hd)
        mask = self._attention_mask(attention_mask[row_ids], start, 1, self._padded(attention_mask))
        x = self.embed[expert_ids.unsqueeze(1), ids].flatten(0, 1)  # (P * T, hidden), pair by pair
        pair_cache = self._steady_pairs((tuple(experts), tuple(rows)), flat, start)
        for i, (layer, keys, values) in enumerate(zip(weights["layers"], self.keys, self.values)):
            q, k, v = block_input(x, layer["qkv"], linear, (count,), new, cos, sin)
            if pair_cache is None:
                flat_keys, flat_values = keys.flatten(0, 1), values.flatten(0, 1)
                flat_keys[flat, :, start:length] = k
                flat_values[flat, :, start:length] = v
                attended = self._attend(q, flat_keys[flat, :, :length], flat_values[flat, :, :length], mask)
            else:
                attended = self._attend(q, *pair_cache.append(i, k, v, start), mask)
            x = block_output(x, attended, layer, linear)
        for e, r in zip(experts, rows):
            self.filled[e][r] = length
        if pair_cache is not None:
            pair_cache.filled = length
        head = _GroupedLinear(experts, self.num_experts, 1, device)
        return head(_normalized(x.view(count, new, -1)[:, -1], self.eps), weights["head"])

    def _drop_pair_cache(self) -> None:
        """Write the pair cache's new columns back to the per-expert caches and forget it."""
        if self._pair_cache is not None:
            self._pair_cache.write_back(self.keys, self.values)
            self._pair_cache = None

    def _block_input(
        self,
        x: Tensor,
        weight: Tensor,
        linear: Callable[[Tensor, Tensor], Tensor],
        lead: tuple[int, ...],
        new: int,
        cos: Tensor,
        sin: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Queries (S, heads, T, hd), keys and values (S, kv_heads, T, hd) of the S = prod(``lead``)
        sequences of T = ``new`` tokens whose residual stream is ``x``: RMSNorm, the fused q/k/v
        projection ``linear(x, weight)``, queries and keys rotated together in one pass (``cos``/``sin``
        broadcast over the leading dimensions they lack)."""
        qkv = linear(_normalized(x, self.eps), weight)
        heads, width = self.heads + self.kv_heads, (self.heads + self.kv_heads) * self.head_dim
        qk = _rotary(qkv[..., :width].reshape(*lead, new, heads, self.head_dim), cos, sin)
        qk = qk.reshape(-1, new, heads, self.head_dim)
        v = qkv[..., width:].reshape(-1, new, self.kv_heads, self.head_dim).transpose(1, 2)
        return qk[:, :, : self.heads].transpose(1, 2), qk[:, :, self.heads :].transpose(1, 2), v

    def _block_output(
        self, x: Tensor, attended: Tensor, layer: dict[str, Tensor], linear: Callable[[Tensor, Tensor], Tensor]
    ) -> Tensor:
        """The residual stream ``x`` after the attention output ``attended`` (S, heads, T, hd) went
        through its projection and the SiLU-gated MLP."""
        x = x + linear(attended.transpose(1, 2).reshape(*x.shape[:-1], -1), layer["o"])
        gate, up = linear(_normalized(x, self.eps), layer["gate_up"]).chunk(2, -1)
        return x + linear(F.silu(gate) * up, layer["down"])

    def _steady_pairs(self, pairs: tuple, flat: Tensor, start: int) -> _PairCache | None:
        """The contiguous caches of ``pairs`` when the same pairs advance again from where they all
        stopped (a router that settled): built on their second call in a row, then extended in place,
        so attention reads views instead of gathering every pair's cache on every token."""
        cache = self._pair_cache
        settled = all(self.filled[e][r] == start for e, r in zip(*pairs))
        if cache is not None and (cache.pairs != pairs or cache.filled != start or not settled):
            self._drop_pair_cache()
            cache = None
        if cache is None and settled and pairs == self._last_pairs:
            cache = self._pair_cache = _PairCache(pairs, flat, self.keys, self.values, start)
        self._last_pairs = pairs
        return cache

    def _attend(self, q: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None) -> Tensor:
        if self.kv_heads != self.heads:  # grouped-query attention (written out: torch 2.4 has no enable_gqa)
            repeat = self.heads // self.kv_heads
            keys, values = keys.repeat_interleave(repeat, dim=1), values.repeat_interleave(repeat, dim=1)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)

    def _padded(self, attention_mask: Tensor) -> bool:
        """Whether the batch has padding: decided on its first call (padding only precedes the
        prompts), so that decoding does not wait for the device at every token to ask again."""
        if self._has_padding is None:
            self._has_padding = not bool(attention_mask.all())
        return self._has_padding

    @staticmethod
    def _attention_mask(attention_mask: Tensor, start: int, count: int, padded: bool) -> Tensor | None:
        """Boolean (E*B, 1, T, S) mask: causal, padding keys hidden, every query sees itself
        (a padded query would otherwise see nothing and turn into NaN; its output is unused).
        One new token needs no mask in a batch without padding (SDPA's fused kernels apply), and
        only its row's padding keys hidden in one with padding."""
        batch, total = attention_mask.shape
        new = total - start
        if new == 1:
            if not padded:
                return None
            allowed = attention_mask.to(torch.bool, copy=True)
            allowed[:, -1] = True
            return allowed.view(batch, 1, 1, total).repeat(count, 1, 1, 1)
        query = torch.arange(start, total, device=attention_mask.device).unsqueeze(1)
        key = torch.arange(total, device=attention_mask.device).unsqueeze(0)
        allowed = (key <= query) & attention_mask.bool().unsqueeze(1)
        allowed |= key == query
        return allowed.unsqueeze(1).repeat(count, 1, 1, 1)
