"""Experts: any Hugging Face causal LM; by default a small Llama-style network."""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from dfm.atomic import atomic_dir
from dfm.errors import DfmError
from models.adapters import base_directory, is_adapter, is_adapter_model, load_merged

#: The default expert: ~1.4M parameters with a 2048-token vocabulary.
DEFAULT_ARCH: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 384,
    "max_position_embeddings": 256,
}


def expert_config(
    vocab_size: int,
    *,
    bos_token_id: int,
    eos_token_id: int,
    tokenizer_fingerprint: str,
    arch: dict[str, Any] | None = None,
) -> PretrainedConfig:
    """A causal-LM config for ``arch`` (a ``model_type`` plus its config fields; default Llama).

    The tokenizer fingerprint travels in config.json, so an expert trained elsewhere can be
    checked against the ensemble's tokenizer. No ``pad_token_id`` goes into the model config:
    Hugging Face models freeze the embedding of that id at zero, and dfm pads with EOS, which is
    also the document separator the model must see. Padding is masked instead, and generation
    pads with EOS (``build_expert`` sets it in the generation config).
    """
    config = arch_config(DEFAULT_ARCH if arch is None else arch, "llama")
    config.update(
        {
            "vocab_size": vocab_size,
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
            "pad_token_id": None,
            "dfm_tokenizer_fingerprint": tokenizer_fingerprint,
        }
    )
    return config


def arch_config(arch: dict[str, Any], default_type: str) -> PretrainedConfig:
    """The Hugging Face config of ``arch`` (a ``model_type``, else ``default_type``, plus its fields).

    A field the model type does not know is refused: transformers would keep it as a stray
    attribute and build the default architecture instead (``hiden_size=64`` is not a hidden size).
    Aliases that transformers translates (``rope_theta``, ``torch_dtype``) are known fields. Refused
    too: a hidden size the attention heads do not divide (unless ``head_dim`` is given), and an odd
    head size under rotary embeddings (one model type's config checks it, another fails in forward).
    """
    fields = dict(arch)
    model_type = fields.pop("model_type", default_type)
    try:
        default = AutoConfig.for_model(model_type)
    except ValueError as err:
        raise DfmError(
            f"unknown expert model_type {model_type!r}: use a Hugging Face model type such as {default_type!r}"
        ) from err
    names = {name: default.attribute_map.get(name, name) for name in ("hidden_size", "num_attention_heads")}
    hidden, heads = (fields.get(names[n], getattr(default, n, None)) for n in ("hidden_size", "num_attention_heads"))
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        if "head_dim" not in fields and hidden % heads:
            raise DfmError(
                f"config expert.arch: {names['hidden_size']} ({hidden}) must be divisible by "
                f"{names['num_attention_heads']} ({heads}); change one of them"
            )
        head_dim = fields.get("head_dim") or hidden // heads
        if "rope_parameters" in default.to_dict() and isinstance(head_dim, int) and head_dim % 2:
            raise DfmError(
                f"config expert.arch: the head size {head_dim} ({names['hidden_size']} / "
                f"{names['num_attention_heads']}) must be even for rotary position embeddings; "
                f"change one of them"
            )
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except Exception as err:  # transformers checks field types and values, raising several error types
        detail = " ".join(line.strip() for line in str(err).splitlines())
        raise DfmError(
            f"config expert.arch is not a valid {model_type} configuration ({detail}): fix that field"
        ) from err
    known = default.to_dict()
    unknown = sorted(set(config.to_dict()) - set(known))
    if unknown:
        hints = {name: difflib.get_close_matches(name, known, n=1) for name in unknown}
        named = ", ".join(f"{name} (did you mean {hints[name][0]}?)" if hints[name] else name for name in unknown)
        raise DfmError(f"config expert.arch has fields a {model_type} model does not have: {named}; fix or drop them")
    return config


def seed_context(name_or_path: str | os.PathLike) -> int | None:
    """The context (max_position_embeddings) of the pretrained seed ``--init-from`` names, read from its config."""
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise DfmError(
            f"cannot read the config of --init-from {str(name_or_path)!r} ({str(err).splitlines()[0]}): "
            f"pass a local save_pretrained directory or a hub name of a causal LM"
        ) from err
    return getattr(config, "max_position_embeddings", None)


def build_expert(config: PretrainedConfig, seed: int = 0) -> PreTrainedModel:
    """A freshly initialised causal LM; the same seed gives the same weights."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = config.eos_token_id
    return model


def load_expert(
    path: str | os.PathLike,
    device: torch.device | str | None = None,
    auto_class: type = AutoModelForCausalLM,
    dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    """Load a saved model (a causal LM unless ``auto_class`` says otherwise) from a local
    directory, safetensors only and no remote code, in eval mode, on ``device`` in ``dtype`` (as
    saved if None). A LoRA adapter (peft) is loaded merged into its base model (``models.adapters``)."""
    path = Path(path)
    if is_adapter(path) and auto_class is AutoModelForCausalLM:
        return load_merged(path, device, dtype)
    if not (path / "config.json").is_file():
        raise DfmError(
            f"no model at {path}: expected config.json and model.safetensors from save_pretrained "
            f"(or a LoRA adapter's adapter_config.json)"
        )
    try:
        model = auto_class.from_pretrained(path, use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # truncated or empty weights included
        raise DfmError(f"cannot load the model at {path} ({str(err).splitlines()[0]}); retrain or re-copy it") from err
    return model.to(device or "cpu", dtype).eval()


def saved_config(path: str | os.PathLike) -> dict | None:
    """config.json of the model saved at ``path`` (of its base model for a LoRA adapter), or None."""
    path = Path(path)
    if is_adapter(path):
        base = base_directory(path)
        path = base if base is not None else path
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None


def branch_from(
    name_or_path: str | os.PathLike,
    *,
    vocab_size: int,
    bos_token_id: int,
    eos_token_id: int,
    tokenizer_fingerprint: str,
) -> PreTrainedModel:
    """A causal LM initialised from a seed: a local ``save_pretrained`` directory or a hub name.

    The seed's vocabulary must cover the tokenizer's (rows beyond it, padding of pretrained
    embeddings, are dropped); the dfm fields of ``expert_config`` are set, and no embedding row
    is frozen as padding (dfm pads with EOS and masks it).
    """
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, trust_remote_code=False)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # truncated or empty weights included
        fix = (
            f"re-copy it, or, if it is a run's seed, delete it and retrain it with `dfm train-seed-model --run "
            f"{Path(name_or_path).parent} --resume`"
            if Path(name_or_path).is_dir()
            else "pass a local save_pretrained directory or a hub name of a causal LM"
        )
        raise DfmError(f"cannot load the seed model {str(name_or_path)!r} ({str(err).splitlines()[0]}): {fix}") from err
    have = model.get_input_embeddings().num_embeddings
    if have < vocab_size:
        raise DfmError(
            f"the seed model {str(name_or_path)!r} has {have} embeddings but the tokenizer has "
            f"{vocab_size} tokens: use the seed's own tokenizer (drop --tokenizer)"
        )
    if have > vocab_size:
        model.resize_token_embeddings(vocab_size)
    model.get_input_embeddings().padding_idx = None
    model.config.update(
        {
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
            "pad_token_id": None,
            "dfm_tokenizer_fingerprint": tokenizer_fingerprint,
        }
    )
    model.generation_config.pad_token_id = eos_token_id
    return model


def save_expert(model: PreTrainedModel, path: str | os.PathLike, state_dict: dict | None = None) -> None:
    """save_pretrained (safetensors) into ``path`` atomically, of ``state_dict`` when given (the
    gathered weights of a sharded model); a LoRA adapter saves the adapter alone (its base's
    embeddings are never adapted, so none are copied)."""
    options = {"save_embedding_layers": False} if is_adapter_model(model) else {}
    if state_dict is not None:
        options["state_dict"] = state_dict
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, **options)


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
