"""LoRA experts (peft): a low-rank adapter trained on the frozen seed model and saved as a peft
adapter (``adapter_config.json`` + ``adapter_model.safetensors``), which
``PeftModel.from_pretrained(seed_model, adapter_dir)`` loads without dfm.

dfm loads an adapter by merging it into its own copy of the seed (``merge_and_unload``): every
expert is then a plain causal LM, so the stacked engine runs all K of them as one batched matmul
per layer. Serving one shared base with K unmerged adapters would hold the base once but runs K
full forwards one after another (every layer's input differs per expert), which is what
the stacked engine exists to avoid; an island still ships and stores only the adapter.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from dfm.errors import DfmError

ADAPTER_CONFIG = "adapter_config.json"

#: expert.lora defaults: rank, scale numerator (the update is alpha / r * B A), dropout on the
#: adapter's input, and the layers adapted ("all-linear": every linear layer but the output head).
DEFAULT_LORA: dict[str, Any] = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}


@contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft 0.2x calls a transformers property deprecated in 5.x; the FutureWarning is not the user's to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _peft():
    try:
        import peft
    except ImportError as err:
        raise DfmError("expert.adapter=lora needs peft: pip install peft (or pip install -e '.[lora]')") from err
    return peft


def check_lora(settings: dict) -> None:
    """Refuse LoRA settings peft would reject later, naming the key."""
    r, alpha, dropout = settings.get("r"), settings.get("alpha"), settings.get("dropout")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise DfmError(f"config expert.lora.r must be a positive integer (the adapter rank), got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise DfmError(f"config expert.lora.alpha must be > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise DfmError(f"config expert.lora.dropout must lie in [0, 1), got {dropout!r}")
    targets = settings.get("target_modules")
    if not (
        targets == "all-linear" or (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))
    ):
        raise DfmError(
            f'config expert.lora.target_modules must be "all-linear" or a list of module names '
            f'(e.g. ["q_proj", "v_proj"]), got {targets!r}'
        )


def add_lora(model: PreTrainedModel, settings: dict, base: str) -> nn.Module:
    """``model`` frozen under a fresh LoRA adapter of ``settings``; ``base`` is where the saved
    adapter says its base model lies (relative to the adapter directory, or a hub name)."""
    peft = _peft()
    check_lora(settings)
    config = peft.LoraConfig(
        r=settings["r"],
        lora_alpha=settings["alpha"],
        lora_dropout=settings["dropout"],
        target_modules=settings["target_modules"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        with _quiet_peft():
            wrapped = peft.get_peft_model(model, config)
    except ValueError as err:
        raise DfmError(
            f"cannot attach LoRA to the seed model ({str(err).splitlines()[0]}): fix expert.lora.target_modules"
        ) from err
    wrapped.peft_config["default"].base_model_name_or_path = base  # peft sets the model's own (absolute) path
    return wrapped


def adapter_parameters(model: nn.Module) -> int:
    """Parameters of the LoRA adapters in ``model`` (0 for a plain model)."""
    return sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)


def is_adapter_model(model: nn.Module) -> bool:
    """True for a peft-wrapped model (what ``add_lora`` returns)."""
    return hasattr(model, "peft_config")


def is_adapter(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def base_directory(path: str | os.PathLike) -> Path | None:
    """The local directory of the base model the adapter at ``path`` adapts (None: a hub name)."""
    base = json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or ""
    return Path(path) / base if base and (Path(path) / base).is_dir() else None


def load_merged(
    path: str | os.PathLike, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """The adapter at ``path`` merged into its own copy of its base model, in eval mode (in ``dtype`` if given)."""
    peft = _peft()
    path = Path(path)
    try:
        config = peft.PeftConfig.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as err:
        raise DfmError(
            f"cannot read the adapter config at {path} ({str(err).splitlines()[0]}); retrain or re-copy it"
        ) from err
    local = base_directory(path)
    base_name = str(local) if local is not None else config.base_model_name_or_path
    try:
        base = AutoModelForCausalLM.from_pretrained(base_name, use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError, RuntimeError) as err:
        raise DfmError(
            f"the adapter at {path} adapts {base_name!r}, which cannot be loaded "
            f"({str(err).splitlines()[0]}): copy the run's seed/ beside experts/"
        ) from err
    try:
        with _quiet_peft():
            merged = peft.PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise DfmError(
            f"cannot load the adapter at {path} ({str(err).splitlines()[0]}); retrain or re-copy it"
        ) from err
    return merged.to(device or "cpu", dtype).eval()
