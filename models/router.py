"""The router: a small causal transformer estimating P(cluster | prefix) at every position.

``Router(input_ids)[b, t]`` are K logits for P(k | x_<=t). At generation time it runs
incrementally next to the experts with its own ``RouterCache``, on batches of left-padded
prompts: positions come from the attention mask, so a padded row gets the same logits as the
unpadded one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from dfm.atomic import atomic_dir, write_json
from dfm.errors import DfmError, reject_unknown_keys
from dfm.tensors import positions_from_mask

MODEL_TYPE = "dfm-router"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class RouterConfig:
    vocab_size: int
    num_experts: int
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    max_positions: int = 256
    dropout: float = 0.0
    #: logits are divided by it: fitted on held-out documents after training (1 = as trained)
    temperature: float = 1.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "num_experts", "hidden_size", "num_layers", "num_heads", "max_positions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DfmError(f"router config: {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise DfmError(
                f"router config: hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise DfmError(f"router config: dropout must be in [0, 1), got {self.dropout!r}")
        temperature = self.temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise DfmError(f"router config: temperature must be a positive number, got {self.temperature!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RouterConfig:
        reject_unknown_keys(d, {f.name for f in fields(cls)}, "router config keys")
        missing = sorted({"vocab_size", "num_experts"} - set(d))
        if missing:
            raise DfmError(f"router config: missing required keys {missing}")
        return cls(**d)


class RouterCache:
    """Per layer, a preallocated (2, B, heads, max_positions, head_dim) key/value buffer filled up
    to ``length``; the (B, length) bool mask of real tokens so far. Writing new columns in place
    (instead of concatenating) keeps an incremental step O(1) in Python and allocation."""

    def __init__(self, num_layers: int) -> None:
        self.key_values: list[Tensor | None] = [None] * num_layers
        self.mask: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def append(self, layer: int, kv: Tensor, start: int, capacity: int) -> Tensor:
        """Store ``kv`` (2, B, heads, T, head_dim) at columns start..start+T; return all columns so far."""
        end = start + kv.shape[3]
        buffer = self.key_values[layer]
        if buffer is None:
            buffer = kv.new_zeros(*kv.shape[:3], capacity, kv.shape[4])
            self.key_values[layer] = buffer
        buffer[:, :, :, start:end] = kv
        return buffer[:, :, :, :end]


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then a 4x GELU MLP."""

    def __init__(self, config: RouterConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_heads
        self.max_positions = config.max_positions
        self.dropout = config.dropout
        self.ln1 = nn.LayerNorm(h)
        self.qkv = nn.Linear(h, 3 * h)
        self.proj = nn.Linear(h, h)
        self.ln2 = nn.LayerNorm(h)
        self.fc_in = nn.Linear(h, 4 * h)
        self.fc_out = nn.Linear(4 * h, h)

    def _drop(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.dropout, training=True) if self.training and self.dropout else x

    def forward(
        self, x: Tensor, attn_bias: Tensor | None, cache: RouterCache | None, layer: int, causal: bool = False
    ) -> Tensor:
        batch, time, hidden = x.shape
        qkv = self.qkv(self.ln1(x)).view(batch, time, 3, self.num_heads, hidden // self.num_heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, batch, heads, time, head_dim)
        q, kv = qkv[0], qkv[1:]
        if cache is not None:
            kv = cache.append(layer, kv, cache.length, self.max_positions)
        attn = F.scaled_dot_product_attention(
            q, kv[0], kv[1], attn_mask=attn_bias, dropout_p=self.dropout if self.training else 0.0, is_causal=causal
        )
        x = x + self._drop(self.proj(attn.transpose(1, 2).reshape(batch, time, hidden)))
        return x + self._drop(self.fc_out(F.gelu(self.fc_in(self.ln2(x)), approximate="tanh")))


class Router(nn.Module):
    """Causal transformer over token ids returning K cluster logits at every position."""

    def __init__(self, config: RouterConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.token_embedding = nn.Embedding(config.vocab_size, h)
        self.position_embedding = nn.Embedding(config.max_positions, h)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(h)
        self.head = nn.Linear(h, config.num_experts)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self) -> RouterCache:
        return RouterCache(self.config.num_layers)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, cache: RouterCache | None = None
    ) -> Tensor:
        """Logits (B, T_new, K) for the new tokens.

        ``attention_mask`` is (B, T_past + T_new), 1 for real tokens and 0 for left padding;
        its past columns must match what the cache already holds (only the new columns are
        read). ``None`` means every new token is real. The cache, when given, is extended in
        place.
        """
        if input_ids.dim() != 2:
            raise DfmError(f"router input_ids must be (batch, time), got shape {tuple(input_ids.shape)}")
        batch, t_new = input_ids.shape
        past = cache.length if cache is not None else 0
        total = past + t_new
        if attention_mask is None:
            new_mask = torch.ones(batch, t_new, dtype=torch.bool, device=input_ids.device)
        elif attention_mask.shape != (batch, total):
            raise DfmError(
                f"router attention_mask must have shape {(batch, total)} (batch, past + new tokens), "
                f"got {tuple(attention_mask.shape)}"
            )
        else:
            new_mask = attention_mask[:, past:].bool()
        if past:
            if cache.mask.shape[0] != batch:
                raise DfmError(f"router cache holds batch size {cache.mask.shape[0]}, input has {batch}")
            full_mask = torch.cat([cache.mask, new_mask], dim=1)
        else:
            full_mask = new_mask

        positions = positions_from_mask(full_mask)[:, past:]
        if total > self.config.max_positions:
            longest = int(positions.max()) + 1
            if longest > self.config.max_positions:
                raise DfmError(
                    f"router sees a prefix of {longest} tokens but max_positions is "
                    f"{self.config.max_positions}; truncate prompts from the left"
                )

        # New query i (absolute position past + i) may attend to key j when j <= past + i and
        # key j is real. A padded query also attends to itself so that no row is fully masked
        # (SDPA returns NaN there). Built once as an additive bias shared by all layers.
        x = self.token_embedding(input_ids) + self.position_embedding(positions)
        attn_bias = None  # one new token and no padding: it may attend to everything cached
        no_padding = bool(full_mask.all())
        causal = past == 0 and t_new > 1 and no_padding  # a fresh unpadded batch: SDPA's own causal kernel
        if (t_new > 1 or not no_padding) and not causal:
            query_index = torch.arange(past, total, device=x.device)[:, None]
            key_index = torch.arange(total, device=x.device)[None, :]
            allowed = (key_index <= query_index) & (full_mask[:, None, None, :] | (key_index == query_index))
            attn_bias = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
            attn_bias.masked_fill_(~allowed, float("-inf"))
        if self.training and self.config.dropout:
            x = F.dropout(x, self.config.dropout, training=True)
        for layer, block in enumerate(self.blocks):
            x = block(x, attn_bias, cache, layer, causal)
        if cache is not None:
            cache.mask = full_mask
        logits = self.head(self.final_norm(x))
        return logits if self.config.temperature == 1 else logits / self.config.temperature

    @torch.no_grad()
    def init_token_embedding(self, embedding: Tensor) -> None:
        """Start the token embedding from another model's (V, H) ``embedding`` (the seed model's):
        its rows projected on their top ``hidden_size`` principal directions, rescaled to this
        router's initial standard deviation, so tokens the seed learnt to be alike start alike."""
        vocab, hidden = self.token_embedding.weight.shape
        if embedding.shape[0] < vocab:
            raise DfmError(f"the seed's embedding has {embedding.shape[0]} rows, the router's vocabulary {vocab}")
        rows = embedding[:vocab].detach().double()
        rows = rows - rows.mean(0)
        _, _, directions = torch.linalg.svd(rows, full_matrices=False)
        projected = rows @ directions[:hidden].T
        if projected.shape[1] < hidden:  # a seed narrower than the router: the rest stays random
            projected = torch.cat([projected, self.token_embedding.weight[:, projected.shape[1] :].double()], 1)
        scale = self.token_embedding.weight.std() / projected.std()
        self.token_embedding.weight.copy_((projected * scale).to(self.token_embedding.weight.dtype))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` atomically."""
        state = {name: value.detach().cpu().contiguous() for name, value in self.state_dict().items()}
        with atomic_dir(directory) as tmp:
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            write_json(tmp / CONFIG_NAME, {"model_type": MODEL_TYPE, **self.config.to_dict()})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device | None = None) -> Router:
        """Build the router from ``config.json`` and load its weights (CPU unless ``device``)."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not directory.is_dir():
            raise DfmError(f"router directory {directory} does not exist; train the router first")
        if not config_path.is_file() or not weights_path.is_file():
            raise DfmError(f"router directory {directory} lacks {CONFIG_NAME} or {WEIGHTS_NAME}; retrain or re-copy it")
        try:
            raw = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise DfmError(f"cannot read {config_path} ({err}); retrain or re-copy the router") from err
        if not isinstance(raw, dict) or raw.pop("model_type", None) != MODEL_TYPE:
            raise DfmError(f"{config_path} is not a {MODEL_TYPE} config; point to a router directory")
        router = cls(RouterConfig.from_dict(raw))
        try:
            state = load_file(str(weights_path), device="cpu")
        except (OSError, SafetensorError) as err:
            raise DfmError(
                f"router weights {weights_path} are corrupt ({str(err).splitlines()[0]}): retrain the "
                f"router with `dfm train-router`, or re-copy {directory}"
            ) from err
        try:
            router.load_state_dict(state, strict=True)
        except RuntimeError as err:  # torch lists every mismatched tensor, one per line
            raise DfmError(
                f"router weights {weights_path} do not match {config_path} ({_mismatch(err)}): retrain "
                f"the router with `dfm train-router`, or re-copy {directory}"
            ) from err
        router.eval()
        return router if device is None else router.to(device)


def _mismatch(err: RuntimeError) -> str:
    """The first mismatch torch's multi-line load_state_dict report names, e.g. "size mismatch for head.weight: ..."."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[1] if len(lines) > 1 else (lines[0] if lines else "no details")


def state_logits(router: nn.Module, states: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """(B, K) logits of a router read causally over whole states (the masked path's X_t): its output
    at each row's last real position (right padding marked 0 in ``attention_mask``), which has seen
    the whole state."""
    last = (
        attention_mask.sum(-1) - 1
        if attention_mask is not None
        else torch.full((states.shape[0],), states.shape[1] - 1, device=states.device)
    )
    return router(states, attention_mask)[torch.arange(states.shape[0], device=states.device), last]
