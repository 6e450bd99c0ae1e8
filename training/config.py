"""The run configuration: nested defaults, a YAML/JSON file on top, `key.sub=value` overrides last."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import yaml

from dfm.errors import DfmError
from dfm.sampling import check_seed
from dfm.schedulers import scheduler
from models.adapters import DEFAULT_LORA, check_lora
from models.expert import DEFAULT_ARCH, arch_config, seed_context
from models.path_kinds import KINDS, PathKind, path_kind
from models.router import RouterConfig
from training.synthetic import SyntheticSpec
from training.trainer import TrainConfig

#: Every key a run understands; a config file or override may only set these.
DEFAULTS: dict[str, Any] = {
    "seed": 0,
    # the probability path of every model in the run (README, "How it works"): "ar" (next token, causal experts)
    # or "masked" (any-order absorbing path, bidirectional experts, an N-step sampler)
    "path": {"kind": "ar", "scheduler": "linear"},
    "num_proc": None,  # worker processes for Dataset.map (None = in process)
    "data": {
        "dataset": None,  # None: the embedded synthetic corpus; else hub name, json|csv|parquet|text, or a saved dir
        "config_name": None,
        "split": None,
        "data_files": None,
        "text_column": "text",
        "cluster_column": None,  # use this label as the partition instead of k-means
        "label_column": None,  # reference label for purity/NMI (synthetic: "domain")
        "streaming": False,
        "max_documents": None,
        "validation_fraction": 0.05,
        "test_fraction": 0.05,
    },
    # longer documents and more of them than SyntheticSpec's defaults: the start of a document is
    # ambiguous between clusters, and top-1 routing pays for it once per document (see README)
    "synthetic": {"num_domains": 4, "num_documents": 6000, "seed": 0, "mean_length": 100},
    # the BPE tokenizer and the partition are fitted on seeded samples of the training documents
    # (null: all of them); every document is then tokenized and assigned in one streaming pass
    "tokenizer": {"path": None, "vocab_size": 2048, "sample_documents": 100_000},
    "partition": {"num_clusters": 4, "balance": 2.0, "svd_dim": None, "iterations": 30, "sample_documents": 50_000},
    # every expert and the baseline branch from one seed model (README, "Seeds"): a public
    # pretrained causal LM (init_from), and/or one trained centrally on the shareable documents
    "seed_model": {
        "init_from": None,  # hub name or local directory of a Hugging Face causal LM (its tokenizer is used)
        "phase": None,  # train a seed on the shared documents: None = yes unless init_from is given
        "shared_column": None,  # boolean column marking the documents every owner may share
        "shared_fraction": 0.25,  # without shared_column: this fraction of every cluster's documents
        "train": {"steps": 1200, "batch_size": 8, "lr": 3e-3, "warmup_steps": 30, "checkpoint_every": 200},
    },
    "expert": {
        "arch": dict(DEFAULT_ARCH),
        # training blocks as long as the context that evaluation and generation use
        "block_size": 256,
        # null: every expert (and the baseline) fine-tunes all of the seed's weights; "lora": each
        # trains a low-rank adapter on the frozen seed (peft), saved as megabytes, for big seeds
        "adapter": None,
        "lora": dict(DEFAULT_LORA),
        "train": {"steps": 150, "batch_size": 8, "lr": 3e-3, "warmup_steps": 15, "checkpoint_every": 50},
    },
    "router": {
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "max_length": 256,  # tokens per training sequence (one document from BOS)
        # what the router learns at every prefix (README, "The router"): cluster, the document's
        # cluster, which every expert's owner has for free; bayes, the experts' posterior, which
        # they must score the documents for (2 x their parameters per token, charged to the ensemble)
        "targets": "cluster",
        "documents": None,  # training documents (bayes: the ones the experts score; null: all)
        "scored_length": None,  # tokens of each such document the experts score (null: max_length); cluster beyond
        "label_documents": 0,  # with bayes: more training documents with their cluster as target (null: all the rest)
        "validation_documents": None,  # validation documents (bayes: scored alike; null: all)
        "windows": True,  # also train on one window from inside every long training document (its cluster)
        # "seed": start the token embedding from the seed model's (its top principal directions) when
        # the run has one (a seed phase or --init-from); null: from scratch
        "init": "seed",
        "dropout": 0.0,
        "temperature": "fit",  # divide the logits by the T that fits the validation documents best; null: 1
        "train": {"steps": 140, "batch_size": 32, "lr": 3e-3, "warmup_steps": 10, "checkpoint_every": 50},
    },
}


def _check_adapter(config: dict) -> None:
    adapter = config["expert"]["adapter"]
    if adapter is None:
        return
    if adapter != "lora":
        raise DfmError(f'config expert.adapter must be null (full fine-tuning) or "lora", got {adapter!r}')
    if is_masked(config):
        raise DfmError("expert.adapter=lora is for causal experts: drop it or use path.kind=ar")
    if not seed_phase(config):
        raise DfmError(
            "expert.adapter=lora adapts the run's seed model RUN/seed: keep the seed phase on "
            "(with --init-from: --set seed_model.phase=true)"
        )
    check_lora(config["expert"]["lora"])


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


def resolve_config(file: str | os.PathLike | None = None, overrides: list[dict] | None = None) -> dict:
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
    validate(config)
    return config


def _positive_int(config: dict, dotted: str, minimum: int = 1, optional: bool = False) -> None:
    value = config
    for part in dotted.split("."):
        value = value[part]
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DfmError(f"config {dotted} must be an integer >= {minimum}, got {value!r}")


def validate(config: dict) -> None:
    """Refuse impossible settings before any work starts, naming the key to fix."""
    check_seed(config["seed"], "config seed (--seed)")
    scheduler(config["path"]["scheduler"])
    if config["path"]["kind"] == "masked" and config["seed_model"]["init_from"] is not None:
        raise DfmError(
            "--init-from branches from a pretrained causal LM, which the masked path cannot use: drop it "
            "(the masked run trains its own seed) or use path.kind=ar"
        )
    _positive_int(config, "num_proc", optional=True)
    _positive_int(config, "partition.num_clusters")
    _positive_int(config, "tokenizer.vocab_size", minimum=257)
    _positive_int(config, "tokenizer.sample_documents", optional=True)
    _positive_int(config, "partition.sample_documents", optional=True)
    _positive_int(config, "expert.block_size", minimum=2)
    _check_model_type(config)
    _check_adapter(config)
    _positive_int(config, "router.max_length", minimum=2)
    _check_context(config)
    seed = config["seed_model"]
    if seed["phase"] not in (None, True, False):
        raise DfmError(f"config seed_model.phase must be true, false or null (auto), got {seed['phase']!r}")
    fraction = seed["shared_fraction"]
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise DfmError(f"config seed_model.shared_fraction must lie in (0, 1], got {fraction!r}")
    TrainConfig.from_dict(seed["train"])
    _positive_int(config, "router.documents", optional=True)
    if config["router"]["targets"] not in ("bayes", "cluster"):
        raise DfmError(f"config router.targets must be bayes or cluster, got {config['router']['targets']!r}")
    for name in ("scored_length", "validation_documents"):
        _positive_int(config, f"router.{name}", optional=True)
    _positive_int(config, "router.label_documents", minimum=0, optional=True)
    if not isinstance(config["router"]["windows"], bool):
        raise DfmError(f"config router.windows must be true or false, got {config['router']['windows']!r}")
    if config["router"]["init"] not in (None, "seed"):
        raise DfmError(f'config router.init must be null (from scratch) or "seed", got {config["router"]["init"]!r}')
    if config["router"]["temperature"] not in (None, "fit"):
        raise DfmError(f'config router.temperature must be null (1) or "fit", got {config["router"]["temperature"]!r}')
    if config["router"]["temperature"] == "fit" and is_masked(config):
        raise DfmError(
            "config router.temperature=fit fits the prefix router of the ar path; the masked path's router "
            "reads noisy states: set router.temperature=null"
        )
    _positive_int(config, "data.max_documents", optional=True)
    for name in ("validation_fraction", "test_fraction"):
        value = config["data"][name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 0.5:
            raise DfmError(f"config data.{name} must lie in (0, 0.5), got {value!r}")
    if not isinstance(config["partition"]["balance"], (int, float)) or config["partition"]["balance"] < 1:
        raise DfmError(f"config partition.balance must be >= 1, got {config['partition']['balance']!r}")
    TrainConfig.from_dict(config["expert"]["train"])
    TrainConfig.from_dict(config["router"]["train"])
    if config["router"]["train"].get("fsdp"):
        raise DfmError(
            "config router.train.fsdp: the router is small and trains replicated; drop fsdp "
            "(expert.train.fsdp and seed_model.train.fsdp shard the big models)"
        )
    router = config["router"]
    RouterConfig(
        vocab_size=1,
        num_experts=1,
        hidden_size=router["hidden_size"],
        num_layers=router["num_layers"],
        num_heads=router["num_heads"],
        dropout=router["dropout"],
    )
    spec = SyntheticSpec.from_dict(config["synthetic"])
    clusters = config["partition"]["num_clusters"]
    if config["data"]["dataset"] is None and config["data"]["cluster_column"] is None and clusters > spec.num_domains:
        raise DfmError(
            f"config partition.num_clusters ({clusters}) exceeds synthetic.num_domains ({spec.num_domains}): "
            f"the embedded corpus has no more domains to separate, so extra clusters split one at random; "
            f"lower --num-clusters or raise synthetic.num_domains"
        )


def _check_context(config: dict) -> None:
    """The expert architecture must build (``models.expert.arch_config``), and training blocks and
    router sequences must fit in the experts' context: expert.arch's, or with --init-from the
    pretrained seed's (the router reads the prefixes the experts read, so its context is theirs)."""
    arch = arch_config(config["expert"]["arch"], run_kind(config).default_arch["model_type"])
    init_from = config["seed_model"]["init_from"]
    if init_from is None:
        context, where = getattr(arch, "max_position_embeddings", None), "expert.arch.max_position_embeddings"
    else:
        context, where = seed_context(init_from), f"max_position_embeddings of --init-from {init_from}"
    if context is None:
        return
    block, length = config["expert"]["block_size"], config["router"]["max_length"]
    if block > context:
        raise DfmError(
            f"config expert.block_size ({block}) exceeds the model context {where} ({context}): "
            f"lower one or raise the other"
        )
    if length > context:
        raise DfmError(
            f"config router.max_length ({length}) exceeds the experts' context {where} ({context}), "
            f"the longest prefix the router is ever asked about: lower router.max_length"
        )


def _check_model_type(config: dict) -> None:
    """The expert architecture must be a Hugging Face model of the path's kind (causal LM or masked LM)."""
    kind = run_kind(config)
    default = kind.default_arch["model_type"]
    model_type = config["expert"]["arch"].get("model_type", default)
    if model_type not in kind.model_types():
        raise DfmError(
            f"config expert.arch.model_type {model_type!r} is not a Hugging Face {kind.model_family} type, which "
            f"the {kind.name} path needs: use e.g. {default!r}"
        )


def read_run_config(run_dir: str | os.PathLike) -> dict:
    """The resolved configuration saved by `dfm prepare` in RUN/config.json."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise DfmError(f"{path} not found: run `dfm prepare --out {run_dir}` (or `dfm run`) first")
    try:
        saved = json.loads(path.read_text())
        config = _merge(defaults_for(saved.get("path", {}).get("kind", "ar")), saved)
        if "arch" in saved.get("expert", {}):  # as prepared: a default added later must not change its models
            config["expert"]["arch"] = saved["expert"]["arch"]
        return config
    except json.JSONDecodeError as err:
        raise DfmError(f"{path} is corrupt ({err}); re-run `dfm prepare`") from err


def scoring_context(config: dict, max_positions: int) -> int:
    """The context experts are scored at (evaluation, router targets): their own, never beyond the
    blocks they were trained on."""
    return min(max_positions, config["expert"]["block_size"])


def is_masked(config: dict) -> bool:
    """Whether the run trains on the masked (any-order) path rather than the autoregressive one."""
    return config["path"]["kind"] == "masked"


def run_kind(config: dict) -> PathKind:
    """The probability path the run trains and samples on (``path.kind``)."""
    return path_kind(config["path"]["kind"])


def seed_phase(config: dict) -> bool:
    """Whether a seed model is trained centrally on the shared documents before the experts branch."""
    phase = config["seed_model"]["phase"]
    return config["seed_model"]["init_from"] is None if phase is None else bool(phase)
