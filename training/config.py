"""The run configuration: nested defaults, a YAML/JSON file on top, `key.sub=value` overrides last."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import yaml

from dfm.errors import DfmError
from models.path_kinds import KINDS
from training.run_config import RunConfig

#: Every key a run understands, with its default (the fields of ``RunConfig``); a config file or
#: override may only set these.
DEFAULTS: dict[str, Any] = RunConfig().to_dict()


def _merge(base: dict, update: dict, where: str = "") -> dict:
    for key, value in update.items():
        name = f"{where}{key}"
        if key not in base:
            raise DfmError(f"unknown config key {name!r}; known keys here: {sorted(base)}")
        open_dict = key in ("arch", "train", "synthetic")  # fields validated by their owners
        if isinstance(base[key], dict) and not open_dict:
            if not isinstance(value, dict):
                raise DfmError(f"config key {name!r} must be a mapping")
            _merge(base[key], value, f"{name}.")
        elif isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise DfmError(f"config key {name!r} must be a mapping")
            same_model = key != "arch" or value.get("model_type", base[key].get("model_type")) == base[key].get(
                "model_type"
            )
            # another model type replaces the default architecture: Llama's fields would leak into it
            base[key] = {**base[key], **value} if same_model else dict(value)
        else:
            base[key] = value
    return base


def parse_override(text: str) -> dict:
    """``a.b.c=value`` -> {"a": {"b": {"c": value}}}, the value parsed as YAML (numbers, null, lists)."""
    if "=" not in text:
        raise DfmError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as err:
        raise DfmError(f"cannot parse the value of {key!r}: {err}") from err
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def load_config_file(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DfmError(f"config file {path} not found")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}  # YAML is a superset of JSON
    except yaml.YAMLError as err:
        raise DfmError(f"config file {path} is not valid YAML/JSON: {str(err).splitlines()[0]}") from err
    if not isinstance(loaded, dict):
        raise DfmError(f"config file {path} must hold a mapping of keys")
    return loaded


#: The learning rate of the seed and expert models of a masked run: at 3e-3 the masked seed sits
#: at the clusters' unigram entropy for most of its 1200 steps, at 1e-3 it is at 2.97 nats/token
#: by step 800 (synthetic corpus, shared documents).
MASKED_LR = 1e-3


#: The training budget of the embedded synthetic corpus on the ar path, on top of DEFAULTS (which
#: suit real corpora such as ../shared/corpora/dev4): its 5,400 short documents are learnt in a few
#: epochs (the shared quarter is 511 blocks: 1200 seed steps are 19 epochs, validation loss 2.77
#: against 1.64 at 200-300), and the smaller budget keeps the default `dfm run` near 2.5 minutes
#: on 2 cores with the same equivalence verdict (README, "Measured figures").
SYNTHETIC_BUDGET: dict[str, Any] = {
    "seed_model": {"train": {"steps": 200, "checkpoint_every": 100}},
    "expert": {"train": {"steps": 100, "batch_size": 4}},
}


#: The masked path's router as before the ar router's defaults changed (not re-measured there):
#: noisy states of 1000 training documents, from scratch, 100 steps.
MASKED_ROUTER: dict[str, Any] = {
    "documents": 1000,
    "init": None,
    "windows": False,
    "temperature": None,
    "train": {**DEFAULTS["router"]["train"], "steps": 100},
}


def defaults_for(kind: str) -> dict:
    """DEFAULTS with the expert architecture of the path ``kind`` (a Llama for ar, a ModernBERT for
    masked) and, for masked, the seed's and experts' learning rate MASKED_LR and MASKED_ROUTER."""
    if kind not in KINDS:
        raise DfmError(f"config path.kind must be one of {sorted(KINDS)}, got {kind!r}")
    config = copy.deepcopy(DEFAULTS)
    config["expert"]["arch"] = dict(KINDS[kind].default_arch)
    if kind == "masked":
        config["seed_model"]["train"]["lr"] = config["expert"]["train"]["lr"] = MASKED_LR
        config["router"].update(MASKED_ROUTER)
    return config


def resolve_config(file: str | os.PathLike | None = None, overrides: list[dict] | None = None) -> RunConfig:
    """Defaults (of the chosen path kind; SYNTHETIC_BUDGET on the embedded corpus's ar path), then the
    config file, then each override; unknown keys are errors."""
    layers = ([load_config_file(file)] if file is not None else []) + list(overrides or [])
    probe = copy.deepcopy(DEFAULTS)
    for layer in layers:
        _merge(probe, copy.deepcopy(layer))
    config = defaults_for(probe["path"]["kind"])
    if probe["path"]["kind"] == "ar" and probe["data"]["dataset"] is None:
        _merge(config, copy.deepcopy(SYNTHETIC_BUDGET))
    for layer in layers:
        _merge(config, layer)
    if config["data"]["dataset"] is None and config["data"]["label_column"] is None:
        config["data"]["label_column"] = "domain"
    resolved = RunConfig.from_dict(config)
    resolved.validate()
    return resolved


def read_run_config(run_dir: str | os.PathLike) -> RunConfig:
    """The resolved configuration saved by `dfm prepare` in RUN/config.json."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise DfmError(f"{path} not found: run `dfm prepare --out {run_dir}` (or `dfm run`) first")
    try:
        saved = json.loads(path.read_text())
        config = _merge(defaults_for(saved.get("path", {}).get("kind", "ar")), saved)
        if "arch" in saved.get("expert", {}):  # as prepared: a default added later must not change its models
            config["expert"]["arch"] = saved["expert"]["arch"]
        return RunConfig.from_dict(config)
    except json.JSONDecodeError as err:
        raise DfmError(f"{path} is corrupt ({err}); re-run `dfm prepare`") from err
